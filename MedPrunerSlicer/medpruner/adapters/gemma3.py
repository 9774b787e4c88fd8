"""Gemma 3 / MedGemma adapter, on the stock `Gemma3ForConditionalGeneration`.

Facts used (from the stock transformers code, models/gemma3 and models/siglip):
- The image processor resizes every image to one fixed square (896 px for the real model) and gives
  pixel_values (S, 3, H, W), one row per slice (`Gemma3ImageProcessor`; pan-and-scan off).
- `Gemma3Model.get_image_features` runs the SigLIP vision tower (no attention mask, no rotary: q and k
  are `q_proj`/`k_proj` of the block's normed input, scaled by `head_dim**-0.5`), then
  `Gemma3MultiModalProjector` reshapes the patches in raster order to a (side, side) grid, average-pools
  it with `avg_pool` (kernel = stride = side / sqrt(mm_tokens_per_image), 4 for the real model) and
  projects: `mm_tokens_per_image` LLM tokens per image, in raster order over the pooled grid.
- `Gemma3Processor` replaces every <start_of_image> of the rendered chat template by
  "\\n\\n<start_of_image>" + <image_soft_token> * mm_tokens_per_image + "<end_of_image>\\n\\n" and
  tokenizes the whole text (without adding <bos> when the template already starts with it).
- `Gemma3Model.forward` builds its attention masks from `token_type_ids` (1 on image tokens): each run
  of consecutive image tokens is one block that attends to itself bidirectionally, on top of the
  causal (and sliding-window) masks (`get_block_sequence_ids_for_mask`, `create_masks_for_vision_model`).
  Decoding steps get no token_type_ids (causal only), as in `prepare_inputs_for_generation`.
- Positions are 1D, 0..L-1 for the full prompt.

Pruning keeps each image's kept tokens contiguous between its <start_of_image> and <end_of_image>, so
the stock mask path, given the token types of the FILTERED sequence, still makes the kept image
tokens of one image attend to each other bidirectionally, and no further.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from transformers import Gemma3ForConditionalGeneration
from transformers.cache_utils import DynamicCache

from ..prompt import expand_placeholder_ids, render_prompt
from .base import ModelAdapter, SlicePixels, VisionFeatures, received_attention


class Gemma3Adapter(ModelAdapter):
    """MedGemma / Gemma 3 vision-language models.

    Token scores: the attention each SigLIP patch receives in the last block, pooled per LLM token by
    the mean over the SAME square window of patches that the projector's average pool turns into
    that token (4x4 patches for the real model); the pool module itself does the pooling, so the
    windows cannot drift apart. The published MedPruner code instead groups 16 CONSECUTIVE patches in
    raster order (`scores.reshape(256, 16).mean(-1)`): "token" i then gets the scores of a strip of 16
    patches along one patch row, of which at most 4 lie in the window of any one LLM token, so its
    scores (and the nucleus chosen from them) do not describe the tokens the LLM actually sees. Keys for the contextual merge are pooled
    over the same windows.

    Positions after pruning: renumbered 0..L'-1 by default, as the published code does for Gemma 3
    (`renumber_positions_default = True`); `MedPruner.from_pretrained(..., renumber_positions=False)`
    keeps the original positions of the full prompt instead.
    """

    family = "gemma3"
    model_types = ("gemma3",)
    default_max_slices = 32
    position_rows = 1
    renumber_positions_default = True

    @classmethod
    def model_class(cls):
        return Gemma3ForConditionalGeneration

    # -- geometry -------------------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    @property
    def tokens_per_side(self) -> int:
        side = math.isqrt(self.tokens_per_image)
        if side * side != self.tokens_per_image:
            raise ValueError(f"mm_tokens_per_image={self.tokens_per_image} is not a square number.")
        return side

    @property
    def image_size(self) -> int:
        """Side of the square every image is resized to: the processor's size (the vision config's image_size)."""
        size = getattr(self.image_processor, "size", None)
        height = None
        if size is not None:
            height = size.get("height") if hasattr(size, "get") else getattr(size, "height", None)
        return int(height or self.model.config.vision_config.image_size)

    @property
    def token_pixels(self) -> int:
        return self.image_size // self.tokens_per_side

    @property
    def preferred_slice_size(self) -> int:
        """The processor's fixed image size: slices of any other size would be resized to it."""
        return self.image_size

    def _token(self, name: str, config_id: int) -> str:
        token = getattr(self.tokenizer, name, None)
        return token if isinstance(token, str) and token else self.tokenizer.convert_ids_to_tokens(int(config_id))

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # -- pixels ---------------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> SlicePixels:
        out = self.image_processor(images=images, do_pan_and_scan=False, return_tensors="pt")
        pixel_values = out["pixel_values"]
        height, width = (int(v) for v in pixel_values.shape[-2:])
        side = self.tokens_per_side
        return SlicePixels(
            pixel_values=pixel_values.to(self.device),
            per_slice=1,
            token_grid=(side, side),
            image_size=(height, width),
        )

    def subset(self, pixels: SlicePixels, indices: list[int]) -> SlicePixels:
        index = torch.as_tensor(indices, dtype=torch.long, device=pixels.pixel_values.device)
        return SlicePixels(
            pixel_values=pixels.pixel_values[index],
            per_slice=1,
            token_grid=pixels.token_grid,
            image_size=pixels.image_size,
        )

    # -- vision ---------------------------------------------------------------------------------
    @property
    def vision_encoder(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def pool_to_tokens(self, patch_values: torch.Tensor) -> torch.Tensor:
        """Per-patch values (K, P) or (K, P, d), patches in raster order, -> per-LLM-token means (K, n) or
        (K, n, d), tokens in raster order: the projector's own average pool over each token's window."""
        pool = self.model.model.multi_modal_projector.avg_pool
        squeeze = patch_values.dim() == 2
        values = patch_values[..., None] if squeeze else patch_values
        count, patches, depth = values.shape
        side = math.isqrt(patches)
        grid = values.transpose(1, 2).reshape(count, depth, side, side)
        pooled = pool(grid).flatten(2).transpose(1, 2)        # (K, n, d)
        return pooled[..., 0] if squeeze else pooled

    def encode(self, pixels: SlicePixels, capture: bool = True) -> VisionFeatures:
        model = self.model.model
        attn = model.vision_tower.encoder.layers[-1].self_attn
        seen: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, args, output):
                seen[name] = output
            return hook

        hooks = [attn.q_proj.register_forward_hook(keep("q")), attn.k_proj.register_forward_hook(keep("k"))] \
            if capture else []
        try:
            out = model.get_image_features(pixels.pixel_values.to(self.device))
        finally:
            for hook in hooks:
                hook.remove()
        embeds = out.pooler_output                                   # (K, n, D)
        if not capture:
            return VisionFeatures(embeds=embeds, scores=None, keys=None)
        count, patches, _ = seen["q"].shape
        heads = attn.num_heads
        q = seen["q"].reshape(count, patches, heads, -1).transpose(1, 2)    # (K, heads, P, d)
        k = seen["k"].reshape(count, patches, heads, -1).transpose(1, 2)
        patch_scores = received_attention(q, k, attn.scale)                 # (K, P), raster order
        scores = self.pool_to_tokens(patch_scores)
        keys = self.pool_to_tokens(k.float().mean(dim=1))                   # (K, n, d)
        return VisionFeatures(embeds=embeds, scores=scores, keys=keys)

    # -- language -------------------------------------------------------------------------------
    def prompt_ids(self, num_slices: int, tokens_per_slice: int, question: str) -> torch.Tensor:
        config = self.model.config
        boi = self._token("boi_token", config.boi_token_id)
        eoi = self._token("eoi_token", config.eoi_token_id)
        image = self._token("image_token", config.image_token_id)
        text = render_prompt(self.tokenizer, num_slices, question)
        if text.count(boi) != num_slices:
            raise ValueError(
                f"The chat template rendered {text.count(boi)} {boi} for {num_slices} slices; "
                "the checkpoint's chat template does not render one image per slice."
            )
        # One image token per image, expanded by id afterwards: a special token is matched whole, so the
        # text around it (the "\n\n" merging with its neighbours included) tokenizes the same.
        text = text.replace(boi, f"\n\n{boi}{image}{eoi}\n\n")
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add_special, return_tensors="pt")["input_ids"].to(torch.long)
        return expand_placeholder_ids(ids, self.image_token_id, tokens_per_slice, num_slices)

    def stock_inputs(self, pixels: SlicePixels, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.device
        input_ids = input_ids.to(device)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels.pixel_values.to(device),
            "token_type_ids": (input_ids == self.image_token_id).to(torch.long),
        }

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.reshape(-1) == self.image_token_id

    def positions(self, input_ids: torch.Tensor, num_slices: int, pixels: SlicePixels) -> tuple[torch.Tensor, int]:
        length = int(input_ids.shape[1])
        return torch.arange(length, dtype=torch.long)[None], length

    def _embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_mask = input_ids == self.image_token_id
        # The image token may lie outside the text vocabulary; its rows are replaced anyway.
        embeds = self.model.model.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        return embeds, image_mask

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
        embeds, image_mask = self._embed(input_ids.to(device))
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual_embeds.to(device, embeds.dtype))
        cache = DynamicCache(config=self.model.config) if cache is None else cache
        # The stock Gemma3Model path builds the bidirectional image blocks from the filtered token types.
        # The 2D mask of ones (as generate passes) keeps the stock mask code from reading gaps in the
        # original positions as boundaries of packed sequences.
        out = self.model.model(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(input_ids, device=device),
            position_ids=positions.to(device),
            token_type_ids=image_mask.to(torch.long),
            cache=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1:]
        return self.model.lm_head(hidden)[0], cache

    def extend(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        device = self.device
        embeds, _ = self._embed(input_ids.to(device))
        out = self.model.model(inputs_embeds=embeds, position_ids=positions.to(device), cache=cache, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1])
