"""Model-family adapters, chosen by the checkpoint's `model_type`."""
from __future__ import annotations

from .base import ModelAdapter, SlicePixels, VisionFeatures
from .gemma3 import Gemma3Adapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {}
for _adapter in (Qwen3VLAdapter, Qwen2_5_VLAdapter, Gemma3Adapter):
    for _model_type in _adapter.model_types:
        ADAPTERS[_model_type] = _adapter

SUPPORTED_FAMILIES = tuple(sorted({a.family for a in ADAPTERS.values()}))


def adapter_for(model_type: str | None) -> type[ModelAdapter] | None:
    """The adapter class for a checkpoint's model_type, or None when the family is not supported."""
    return ADAPTERS.get(model_type or "")


__all__ = [
    "ADAPTERS", "SUPPORTED_FAMILIES", "Gemma3Adapter", "ModelAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter",
    "SlicePixels", "VisionFeatures", "adapter_for",
]
