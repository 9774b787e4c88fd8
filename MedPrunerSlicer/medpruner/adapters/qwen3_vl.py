"""Qwen3-VL adapter, on the stock `Qwen3VLForConditionalGeneration`.

Facts used (from the stock transformers code): patches come out of the image processor grouped
window by window (each run of merge_size**2 consecutive patches is one LLM token), the vision
encoder attends within each image (cu_seqlens), its last block applies a 2D rotary embedding to
q and k, the merger turns each window into one LLM token, DeepStack adds merged features of some
vision blocks to the first decoder layers' hidden states at the visual positions, and M-RoPE
positions come from `Qwen3VLModel.get_rope_index`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from ..prompt import expand_placeholder_ids, render_prompt, tokenize_prompt
from .base import ModelAdapter, SlicePixels, VisionFeatures
from .scores import received_attention


class Qwen3VLAdapter(ModelAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    default_max_slices = 32
    position_rows = 3

    @classmethod
    def model_class(cls):
        return Qwen3VLForConditionalGeneration

    # -- geometry -------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def token_pixels(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def preferred_slice_size(self) -> int:
        """Largest multiple of token_pixels, at most 448, whose square the processor keeps unchanged."""
        size = getattr(self.image_processor, "size", None) or {}
        longest = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
        side = self.max_preferred_slice_size
        if longest:
            side = min(side, int(np.sqrt(longest)))
        return max(self.token_pixels, side // self.token_pixels * self.token_pixels)

    @property
    def image_token(self) -> str:
        return getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # -- pixels ---------------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> SlicePixels:
        out = self.image_processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"].to(torch.long)
        if not bool((grid == grid[0]).all()):
            raise ValueError("The image processor gave slices different grids; all slices must have the same size.")
        t, h, w = (int(v) for v in grid[0])
        return SlicePixels(
            pixel_values=out["pixel_values"].to(self.device),   # one transfer; the filter and encoder read it there
            per_slice=t * h * w,
            token_grid=(h // self.merge_size, w // self.merge_size),
            image_size=(h * self.patch_size, w * self.patch_size),
            extras={"grid_thw": grid},
        )

    def subset(self, pixels: SlicePixels, indices: list[int]) -> SlicePixels:
        index = torch.as_tensor(indices, dtype=torch.long)
        rows = pixels.stacked()[index.to(pixels.pixel_values.device)].reshape(-1, *pixels.pixel_values.shape[1:])
        return SlicePixels(
            pixel_values=rows,
            per_slice=pixels.per_slice,
            token_grid=pixels.token_grid,
            image_size=pixels.image_size,
            extras={"grid_thw": pixels.extras["grid_thw"][index]},
        )

    # -- vision ---------------------------------------------------------------------------------
    def encode(self, pixels: SlicePixels, capture: bool = True) -> VisionFeatures:
        model = self.model.model
        attn = model.visual.blocks[-1].attn
        window = self.merge_size**2
        count = pixels.num_slices
        seen: dict[str, Any] = {}

        def before_attention(module, args, kwargs):
            seen["rotary"] = kwargs["position_embeddings"]

        def after_qkv(module, args, output):
            # q and k exactly as the block uses them: split heads, then its rotary embedding.
            length = output.shape[0]
            q, k, _ = output.reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = seen["rotary"]
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            patches = length // count              # the block attends within each slice (cu_seqlens)
            q = q.reshape(count, patches, attn.num_heads, -1).transpose(1, 2)   # (K, heads, patches, d)
            k = k.reshape(count, patches, attn.num_heads, -1).transpose(1, 2)
            # Each slice's own attention (never one over all slices), without its N x N matrix.
            received = received_attention(q, k, attn.scaling)                    # (K, patches) float32
            seen["scores"] = received.reshape(count, -1, window).mean(dim=-1)
            pooled = k.float().transpose(1, 2).reshape(count, -1, window, attn.num_heads, k.shape[-1])
            seen["keys"] = pooled.mean(dim=2).mean(dim=2)

        hooks = [
            attn.register_forward_pre_hook(before_attention, with_kwargs=True),
            attn.qkv.register_forward_hook(after_qkv),
        ] if capture else []
        try:
            grid = pixels.extras["grid_thw"].to(self.device)
            out = model.get_image_features(pixels.pixel_values.to(self.device), grid, return_dict=True)
        finally:
            for hook in hooks:
                hook.remove()
        return VisionFeatures(
            embeds=torch.stack(out.pooler_output),
            scores=seen.get("scores"),
            keys=seen.get("keys"),
            token_features={"deepstack": [torch.stack(layer) for layer in out.deepstack_features]},
        )

    # -- language -------------------------------------------------------------------------------
    def prompt_ids(self, num_slices: int, tokens_per_slice: int, question: str) -> torch.Tensor:
        ids = tokenize_prompt(self.tokenizer, render_prompt(self.tokenizer, num_slices, question))
        return expand_placeholder_ids(ids, self.image_token_id, tokens_per_slice, num_slices)

    def stock_inputs(self, pixels: SlicePixels, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.device
        input_ids = input_ids.to(device)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels.pixel_values.to(device),
            "image_grid_thw": pixels.extras["grid_thw"].to(device),
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int),
        }

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.reshape(-1) == self.image_token_id

    def positions(self, input_ids: torch.Tensor, num_slices: int, pixels: SlicePixels) -> tuple[torch.Tensor, int]:
        grid = pixels.extras["grid_thw"][:1].repeat(num_slices, 1)
        token_type = (input_ids == self.image_token_id).to(torch.int)
        position_ids, deltas = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_type, image_grid_thw=grid
        )
        return position_ids[:, 0, :], int(input_ids.shape[1] + deltas.reshape(-1)[0])

    def prefill(
        self,
        input_ids: torch.Tensor,
        visual_embeds: torch.Tensor,
        visual_features: dict[str, list[torch.Tensor]],
        positions: torch.Tensor,
        all_logits: bool = False,
        cache: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        device = self.device
        input_ids = input_ids.to(device)
        embeds = self.model.model.get_input_embeddings()(input_ids)
        visual_mask = input_ids == self.image_token_id
        embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), visual_embeds.to(device, embeds.dtype))
        out = self.model.model.language_model(
            inputs_embeds=embeds,
            position_ids=positions.to(device)[:, None, :],
            cache=cache,
            use_cache=True,
            visual_pos_masks=visual_mask,
            deepstack_visual_embeds=visual_features.get("deepstack"),
        )
        hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1:]
        return self.model.lm_head(hidden)[0], out.cache

    def extend(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        device = self.device
        embeds = self.model.model.get_input_embeddings()(input_ids.to(device))
        out = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=positions.to(device)[:, None, :], cache=cache, use_cache=True
        )
        return self.model.lm_head(out.last_hidden_state[:, -1])
