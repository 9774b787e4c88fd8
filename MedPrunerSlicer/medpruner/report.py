"""report.json: the versioned record of one answered question (what, how, and what the model saw).

Only geometry and settings are recorded about the input: no file names, no DICOM tags, no IDs.
Schema "medpruner.report/1" is documented in the README; fields are only ever added within a version.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomic
from .result import _jsonable

SCHEMA = "medpruner.report/1"


def _software(engine) -> dict[str, str]:
    import SimpleITK
    import torch
    import transformers

    from . import __version__

    return {
        "medpruner": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "simpleitk": SimpleITK.Version_VersionString(),
        "python": platform.python_version(),
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
    }


def _answer_summary(result) -> dict[str, Any]:
    return {
        "answer": result.answer,
        "generated_token_ids": list(result.token_ids),
        "counts": dict(result.counts),
        "timings_s": dict(result.timings),
        "peak_memory_bytes": result.peak_memory_bytes,
    }


def build_report(engine, request, stack, result, unpruned=None) -> dict[str, Any]:
    """Everything a reader (CLI, server client, Slicer) needs to show and audit one answer."""
    from .heatmaps import KEPT_LABELS

    mapping = stack.mapping
    kept = np.asarray(result.slice_kept, dtype=bool)
    per_slice_total = [h * w for h, w in result.token_grid]
    per_slice_kept = [0 if role is None else int((role > 0).sum()) for role in result.token_role]
    total, kept_tokens = result.counts["visual_tokens_total"], result.counts["visual_tokens_kept"]
    per_slice = [
        {
            "model_index": i,
            "voxel_index": int(mapping.input_index[i]),
            "slab": list(mapping.input_slabs[i]),
            "kept": bool(kept[i]),
            "l1_to_anchor": result.slice_l1[i],
            "tokens_total": per_slice_total[i],
            "tokens_kept": per_slice_kept[i],
            "retention": per_slice_kept[i] / per_slice_total[i],
        }
        for i in range(len(kept))
    ]
    report = {
        "schema": SCHEMA,
        "question": request.question,
        "answer": result.answer,
        "model_id": engine.model_id,
        "model_family": engine.adapter.family,
        "demo_model": bool(getattr(engine, "is_demo_model", False)),
        "config": request.pruning.to_dict(),
        "request": {
            "axis": request.axis,
            "window": request.window,
            "max_slices": request.max_slices,
            "max_new_tokens": request.max_new_tokens,
            "compare": request.compare,
        },
        "window": dict(stack.window),
        "input": {
            "size": list(mapping.input_size),
            "spacing": list(mapping.input_spacing),
            "origin": list(mapping.input_origin),
            "direction": list(mapping.input_direction),
            "slice_axis_ijk": "IJK"[2 - mapping.input_axis],
            "obliquity_deg": mapping.obliquity_deg,
            "geometry_assumed": bool(stack.geometry_assumed),
            "notes": list(stack.input_notes),
        },
        "slices": {
            "total": int(mapping.display_shape[0]),
            "sent": len(kept),
            "kept": int(kept.sum()),
            "sent_voxel_indices": [int(v) for v in mapping.input_index],
            "kept_voxel_indices": [int(v) for v, k in zip(mapping.input_index, kept) if k],
            "l1_to_anchor": result.slice_l1,
            "per_slice": per_slice,
        },
        "tokens": {
            "total_visual": total,
            "kept_visual": kept_tokens,
            "retention": kept_tokens / total if total else 0.0,
            "per_slice_kept": per_slice_kept,
            "grid": list(result.token_grid[0]) if result.token_grid else [0, 0],
            "token_pixels": engine.adapter.token_pixels,
            "image_size": list(result.image_size),
        },
        "prompt_tokens": {
            "full": result.counts["prompt_tokens_full"],
            "pruned": result.counts["prompt_tokens_pruned"],
        },
        "generated_token_ids": list(result.token_ids),
        "timings_s": dict(result.timings),
        "decode_path": result.decode_path,
        "peak_memory_bytes": result.peak_memory_bytes,
        "labels": {str(k): {"name": v["name"], "rgba": list(v["rgba"])} for k, v in KEPT_LABELS.items()},
        "mapping": mapping.to_dict(),
        "software": _software(engine),
    }
    if unpruned is not None:
        report["unpruned"] = _answer_summary(unpruned)
    return _jsonable(report)


def write_json_atomic(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".json")
