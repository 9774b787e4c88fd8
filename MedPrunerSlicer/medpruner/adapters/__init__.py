"""Model-family adapters, chosen by the checkpoint's `model_type`."""
from __future__ import annotations

from .base import ModelAdapter, SlicePixels, VisionFeatures
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {}
for _adapter in (Qwen3VLAdapter,):
    for _model_type in _adapter.model_types:
        ADAPTERS[_model_type] = _adapter

SUPPORTED_FAMILIES = tuple(sorted({a.family for a in ADAPTERS.values()}))


def adapter_for(model_type: str | None) -> type[ModelAdapter] | None:
    """The adapter class for a checkpoint's model_type, or None when the family is not supported."""
    return ADAPTERS.get(model_type or "")


__all__ = ["ADAPTERS", "SUPPORTED_FAMILIES", "ModelAdapter", "SlicePixels", "VisionFeatures", "adapter_for"]
