"""Qwen2.5-VL adapter, on the stock `Qwen2_5_VLForConditionalGeneration`.

Qwen2.5-VL shares Qwen3-VL's processor layout (patches grouped merge window by merge window, one
<|image_pad|> per LLM token), its M-RoPE interface (`get_rope_index`) and its language-model calls,
so the adapter reuses `Qwen3VLAdapter` for those; it has no DeepStack. What differs is the vision
encoder (facts from the stock transformers code, models/qwen2_5_vl/modeling_qwen2_5_vl.py and
vision_utils.py):
- `Qwen2_5_VisionTransformerPretrainedModel.forward` reorders the merge units (runs of
  spatial_merge_size**2 patches) into attention windows with `window_index` from
  `get_vision_window_index(grid_thw, spatial_merge_size, window_size, patch_size)`, runs every block
  in that order, and puts the merged tokens back with `argsort(window_index)`.
- Blocks listed in `fullatt_block_indexes` attend within each image (`cu_seqlens`); the others within
  each window (`cu_window_seqlens`, windows of window_size px, ragged at the image edges). The block
  receives its segments as the `cu_seqlens` argument of its attention, q and k come from `attn.qkv`,
  split into heads, with `apply_rotary_pos_emb_vision`, scaled by `attn.scaling`.

So the last block's attention is captured as that block computes it, segment by segment (whatever
kind of block it is), then the per-patch scores and keys are put back into the ORIGINAL patch order
(the inverse of window_index) before pooling per merge window, the order of the LLM tokens.
"""
from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_window_index

from .base import SlicePixels, VisionFeatures, received_attention
from .qwen3_vl import Qwen3VLAdapter


def segment_received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention each row receives when rows attend only within the segments of `cu_seqlens`.

    q, k: (N, heads, d) in the order the block sees them. Returns (N,) float32: per segment,
    softmax(q kᵀ * scaling) over its keys, mean over heads, summed over its queries. Segments of
    one length are batched together (the windows of a grid have a handful of lengths).
    """
    bounds = cu_seqlens.tolist()
    received = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    by_length: dict[int, list[int]] = {}
    for start, end in pairwise(bounds):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        rows = (torch.as_tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        qs = q[rows].reshape(len(starts), length, *q.shape[1:]).transpose(1, 2)   # (B, heads, length, d)
        ks = k[rows].reshape(len(starts), length, *k.shape[1:]).transpose(1, 2)
        received[rows] = received_attention(qs, ks, scaling).reshape(-1)
    return received


class Qwen2_5_VLAdapter(Qwen3VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    default_max_slices = 32
    position_rows = 3
    renumber_positions_default = False   # the published code keeps Qwen-VL's original M-RoPE positions

    @classmethod
    def model_class(cls):
        return Qwen2_5_VLForConditionalGeneration

    # -- vision ---------------------------------------------------------------------------------
    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The stock encoder's window order of the merge units of these images (window position -> unit)."""
        visual = self.model.model.visual
        index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return index.to(grid_thw.device)

    def encode(self, pixels: SlicePixels, capture: bool = True) -> VisionFeatures:
        model = self.model.model
        attn = model.visual.blocks[-1].attn
        unit = self.merge_size**2
        count = pixels.num_slices
        seen: dict[str, Any] = {}

        def before_attention(module, args, kwargs):
            seen["cu_seqlens"] = kwargs["cu_seqlens"]
            seen["rotary"] = kwargs["position_embeddings"]

        def after_qkv(module, args, output):
            length = output.shape[0]
            q, k, _ = output.reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = seen["rotary"]
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            seen["received"] = segment_received_attention(q, k, seen["cu_seqlens"], attn.scaling)
            seen["k"] = k

        hooks = [
            attn.register_forward_pre_hook(before_attention, with_kwargs=True),
            attn.qkv.register_forward_hook(after_qkv),
        ] if capture else []
        grid = pixels.extras["grid_thw"].to(self.device)
        try:
            out = model.get_image_features(pixels.pixel_values.to(self.device), grid, return_dict=True)
        finally:
            for hook in hooks:
                hook.remove()
        embeds = torch.stack(out.pooler_output)                      # (K, n, D), original token order
        if not capture:
            return VisionFeatures(embeds=embeds, scores=None, keys=None)
        # Window order -> original order: window position u holds merge unit window_index[u].
        restore = torch.argsort(self.window_index(grid))
        received = seen["received"].reshape(-1, unit)[restore]                      # (K * n, unit)
        keys = seen["k"].float().reshape(-1, unit, attn.num_heads, seen["k"].shape[-1])[restore]
        return VisionFeatures(
            embeds=embeds,
            scores=received.mean(dim=1).reshape(count, -1),
            keys=keys.mean(dim=1).mean(dim=1).reshape(count, -1, keys.shape[-1]),
        )

    # -- language -------------------------------------------------------------------------------
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
            inputs_embeds=embeds, position_ids=positions.to(device)[:, None, :], cache=cache, use_cache=True
        )
        hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1:]
        return self.model.lm_head(hidden)[0], out.cache
