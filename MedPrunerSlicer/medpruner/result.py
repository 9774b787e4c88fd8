"""AskResult: the answer and every pruning decision behind it, in plain numpy for the layers above."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _jsonable(value: Any) -> Any:
    """Arrays to lists and NaN/Inf to None, so the result is strict JSON."""
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@dataclass
class AskResult:
    """One answered question. Token arrays are (h, w) in raster order; None marks dropped slices."""

    answer: str
    token_ids: list[int]
    slice_kept: np.ndarray
    slice_l1: np.ndarray
    token_grid: list[tuple[int, int]]
    token_scores: list[np.ndarray | None]
    token_role: list[np.ndarray | None]
    counts: dict[str, int]
    timings: dict[str, float]
    peak_memory_bytes: int | None
    image_size: tuple[int, int] = (0, 0)
    model_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    prefix_reused: bool = False   # a follow-up answered from the cached pruned prefix
    decode_path: str = ""         # how the answer was decoded, e.g. "static-cache+cuda-graph" (engine.DECODE_PATHS)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "answer": self.answer,
                "token_ids": list(self.token_ids),
                "slice_kept": self.slice_kept,
                "slice_l1": self.slice_l1,
                "token_grid": [list(g) for g in self.token_grid],
                "token_scores": self.token_scores,
                "token_role": self.token_role,
                "counts": dict(self.counts),
                "timings": dict(self.timings),
                "peak_memory_bytes": self.peak_memory_bytes,
                "image_size": list(self.image_size),
                "model_id": self.model_id,
                "config": dict(self.config),
                "prefix_reused": self.prefix_reused,
                "decode_path": self.decode_path,
            }
        )
