"""The job parameters a client may send: a strict schema, so a typo or an out-of-range value is a 422
naming the field instead of a silently ignored setting."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_QUESTION_CHARS = 2000


class PruningParams(BaseModel):
    """MedPruner settings, with the same ranges as medpruner.PruningConfig."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = True
    slice_filter: bool = True
    token_filter: bool = True
    gamma: float = Field(0.05, ge=0, le=10)
    tau: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(2.0, gt=0, le=100)
    contextual_ratio: float = Field(0.05, ge=0, lt=1)
    merge: Literal["reference", "mean"] = "reference"


class JobParams(BaseModel):
    """One question about one volume (uploaded with it, or named by the volume_id of an earlier answer)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    pruning: PruningParams = Field(default_factory=PruningParams)
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    window: str = Field("auto", min_length=1, max_length=32)
    max_slices: int | None = Field(None, ge=1, le=1024)
    max_new_tokens: int = Field(128, ge=1, le=2048)
    compare: bool = False
    volume_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the question is blank")
        return value
