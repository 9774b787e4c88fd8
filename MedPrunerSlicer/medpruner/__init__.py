"""medpruner: MedPruner token pruning for 3D medical vision-language models (no Slicer imports)."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import PruningConfig
from .errors import Cancelled, InputError, MedPrunerError, ModelLoadError, VolumeError

__all__ = [
    "AskResult",
    "Cancelled",
    "InputError",
    "MedPruner",
    "MedPrunerError",
    "ModelLoadError",
    "PreparedVolume",
    "PruningConfig",
    "VolumeError",
    "__version__",
]


def __getattr__(name: str):
    # torch and transformers load only when the engine is used, so `medpruner --help` stays fast.
    if name in ("MedPruner", "PreparedVolume"):
        from . import engine

        return getattr(engine, name)
    if name == "AskResult":
        from .result import AskResult

        return AskResult
    raise AttributeError(f"module 'medpruner' has no attribute {name!r}")
