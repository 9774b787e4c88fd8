"""What the engine needs from a model family, so the pruning logic is written once.

An adapter wraps the STOCK transformers model of one family: it turns slices into the model's
pixel inputs, encodes kept slices while capturing the last vision block's attention scores and
keys through hooks, builds the prompt ids and the original rotary positions of the full sequence,
and runs the stock language model on a filtered sequence (prefill, then one token at a time).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .scores import received_attention  # noqa: F401  (the adapters' score capture; re-exported)


@dataclass
class SlicePixels:
    """Model-ready pixels of a stack of same-sized slices."""

    pixel_values: torch.Tensor            # the processor's output, slices concatenated in order
    per_slice: int                        # rows of pixel_values per slice
    token_grid: tuple[int, int]           # LLM-token grid (h, w) of every slice
    image_size: tuple[int, int]           # (H, W) in pixels after the processor's own resize
    extras: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. grid_thw)

    @property
    def num_slices(self) -> int:
        return self.pixel_values.shape[0] // self.per_slice

    def stacked(self) -> torch.Tensor:
        """(S, per_slice, ...) view, for the slice filter and for picking slices."""
        return self.pixel_values.reshape(self.num_slices, self.per_slice, *self.pixel_values.shape[1:])


@dataclass
class VisionFeatures:
    """Vision-encoder outputs of K encoded slices of n LLM tokens each, tokens in raster order."""

    embeds: torch.Tensor                  # (K, n, D) LLM-ready visual token embeddings
    scores: torch.Tensor | None           # (K, n) attention received in the last vision block, per LLM token
    keys: torch.Tensor | None             # (K, n, d) last-block keys pooled per LLM token, for similarity
    token_features: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # ^ other per-token features to filter alongside the embeddings: name -> per layer (K, n, D)


class ModelAdapter(ABC):
    """Base class of one model family's adapter."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    default_max_slices: ClassVar[int] = 32
    max_preferred_slice_size: ClassVar[int] = 448
    # Positions of the kept tokens after pruning. False: their ORIGINAL positions (those of the full
    # sequence, filtered; what the published code does for Qwen-VL). True: renumbered 0..L'-1 over the
    # kept sequence, every position row alike (what the published code does for Gemma3/MedGemma).
    # Each family sets its published default; `MedPruner.from_pretrained(..., renumber_positions=...)`
    # overrides it. Without pruning both give the full sequence's positions for 1D rotary models.
    renumber_positions_default: ClassVar[bool] = False

    def __init__(self, model, tokenizer, image_processor, *, renumber_positions: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if renumber_positions is not None and not isinstance(renumber_positions, bool):
            raise ValueError(f"renumber_positions must be True, False or None, got {renumber_positions!r}.")
        self.renumber_positions = (
            self.renumber_positions_default if renumber_positions is None else renumber_positions
        )

    @classmethod
    @abstractmethod
    def model_class(cls):
        """The stock transformers class to load checkpoints of this family with."""

    @property
    @abstractmethod
    def token_pixels(self) -> int:
        """Side, in model pixels, of the square one LLM token covers."""

    @property
    def preferred_slice_size(self) -> int:
        """Square side the volume layer fits slices into: a multiple of token_pixels."""
        return self.max_preferred_slice_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vision_encoder(self) -> torch.nn.Module:
        """The stock vision encoder module (e.g. for hooks that time it); Qwen-VL's `model.model.visual`."""
        return self.model.model.visual

    @abstractmethod
    def preprocess(self, images: list[np.ndarray]) -> SlicePixels:
        """Pixels exactly as the checkpoint's own image processor makes them."""

    @abstractmethod
    def subset(self, pixels: SlicePixels, indices: list[int]) -> SlicePixels:
        """The pixels of the slices at `indices` only."""

    @abstractmethod
    def encode(self, pixels: SlicePixels, capture: bool = True) -> VisionFeatures:
        """Stock vision encoder on these slices, with last-block scores and keys captured by hooks.

        capture=False runs the plain stock encoder (no scores, no keys): the benchmark's ideal path.
        """

    @abstractmethod
    def prompt_ids(self, num_slices: int, tokens_per_slice: int, question: str) -> torch.Tensor:
        """(1, L) ids of the full prompt, exactly what the stock processor would produce."""

    @abstractmethod
    def stock_inputs(self, pixels: SlicePixels, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments of the stock model's forward/generate for this prompt: the unpruned baseline."""

    @abstractmethod
    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(L,) bool: positions that hold visual tokens."""

    @abstractmethod
    def positions(self, input_ids: torch.Tensor, num_slices: int, pixels: SlicePixels) -> tuple[torch.Tensor, int]:
        """Original rotary positions of the FULL sequence (P, L) and the position of the first new token."""

    @abstractmethod
    def prefill(
        self,
        input_ids: torch.Tensor,
        visual_embeds: torch.Tensor,
        visual_features: dict[str, list[torch.Tensor]],
        positions: torch.Tensor,
        all_logits: bool = False,
        cache: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        """Stock language model on the (already filtered) sequence; returns (logits, cache).

        cache None: a new stock dynamic cache; else an empty cache to fill (e.g. `static_cache`)."""

    @abstractmethod
    def extend(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """Text tokens (1, L) at `positions` (P, L) through the stock language model on top of `cache`
        (which grows by L); returns the logits (1, V) of the last one."""

    position_rows: ClassVar[int] = 1   # rows of the rotary position ids (3 for M-RoPE)

    def decode_step(self, token_id: int, position: int, cache: Any) -> torch.Tensor:
        """One generated token at `position`; returns its logits (V,)."""
        ids = torch.tensor([[token_id]], dtype=torch.long, device=self.device)
        positions = torch.full((self.position_rows, 1), position, dtype=torch.long, device=self.device)
        return self.extend(ids, positions, cache)[0]

    def static_cache(self, length: int) -> Any:
        """Preallocated KV buffers for `length` tokens: one full-length stock `StaticLayer` per decoder layer.

        Sliding-window layers get a full-length layer too: the stock mask then applies their window
        over cache slots from device tensors alone, so one captured decode step stays right at every
        step (the stock sliding layer decides with Python counters, which a CUDA graph would freeze).
        """
        from transformers.cache_utils import Cache, StaticLayer

        layers = self.model.config.get_text_config().num_hidden_layers
        return Cache(layers=[StaticLayer(max_cache_len=length) for _ in range(layers)])

    @staticmethod
    def fill_cache(cache: Any, source: Any, length: int) -> None:
        """Copy `source` (the stock dynamic cache of a `length`-token prefix) into the first slots of
        the static `cache`; the prefix itself is left untouched, so follow-ups never see each other."""
        for target, layer in zip(cache.layers, source.layers, strict=True):
            stored = layer.keys.shape[-2]      # a sliding-window layer keeps only its last tokens
            if not target.is_initialized:
                target.lazy_initialization(layer.keys, layer.values)
            target.keys[:, :, length - stored:length].copy_(layer.keys)
            target.values[:, :, length - stored:length].copy_(layer.values)
            target.cumulative_length.fill_(length)

    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
