"""PruningConfig: MedPruner's knobs, validated when built so a bad value never reaches the model."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

MERGE_MODES = ("reference", "mean")


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"PruningConfig.{field}={value!r} is out of range: it must be {allowed}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PruningConfig:
    """MedPruner settings (arXiv 2603.11625).

    enabled: master switch; False runs the stock model on every slice and token.
    slice_filter / token_filter: stage 1 (inter-slice anchor filter) / stage 2 (information nucleus).
    gamma: a slice is kept when its mean |difference| to the current anchor exceeds gamma.
    tau: each slice keeps the smallest set of tokens whose probability mass reaches tau.
    temperature: softmax temperature turning attention scores into a distribution.
    contextual_ratio: share of a slice's tokens kept as contextual tokens that absorb pruned ones.
    merge: "reference" (target + mean of merged, as the published code) or "mean" (plain mean).
    """

    enabled: bool = True
    slice_filter: bool = True
    token_filter: bool = True
    gamma: float = 0.05
    tau: float = 0.9
    temperature: float = 2.0
    contextual_ratio: float = 0.05
    merge: str = "reference"

    def __post_init__(self) -> None:
        for name in ("enabled", "slice_filter", "token_filter"):
            value = getattr(self, name)
            _check(isinstance(value, bool), name, value, "True or False")
        _check(_is_number(self.gamma) and self.gamma >= 0, "gamma", self.gamma, "a number >= 0")
        _check(_is_number(self.tau) and 0 < self.tau <= 1, "tau", self.tau, "a number with 0 < tau <= 1")
        _check(_is_number(self.temperature) and self.temperature > 0, "temperature", self.temperature, "a number > 0")
        _check(
            _is_number(self.contextual_ratio) and 0 <= self.contextual_ratio < 1,
            "contextual_ratio",
            self.contextual_ratio,
            "a number with 0 <= contextual_ratio < 1",
        )
        _check(self.merge in MERGE_MODES, "merge", self.merge, f"one of {', '.join(MERGE_MODES)}")

    @property
    def prunes_slices(self) -> bool:
        return self.enabled and self.slice_filter

    @property
    def prunes_tokens(self) -> bool:
        return self.enabled and self.token_filter

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningConfig":
        """Build from a JSON-like dict, refusing unknown keys so a typo is never silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown PruningConfig field(s): {', '.join(unknown)}. Known fields: {', '.join(sorted(known))}."
            )
        return cls(**data)
