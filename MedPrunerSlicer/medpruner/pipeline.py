"""Volume file + question -> answer, heatmaps in the input's geometry, report and overview.

The one code path behind `medpruner ask`, `medpruner demo` and the server: the same request
gives the same files whichever door it came in through.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import PruningConfig
from .errors import Cancelled, InputError, SettingsMismatch, UnknownVolume
from .outputs import staged_outputs
from .report import build_report, write_json_atomic

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]
TextFn = Callable[[str, str], None]   # (delta, answer so far), as MedPruner.ask calls it

AXES = ("axial", "coronal", "sagittal")
MAX_NEW_TOKENS_LIMIT = 4096
OUTPUT_FILES = ("report.json", "heatmap_kept.nrrd", "heatmap_attention.nrrd", "overview.png")

# Progress: loading and writing take a fixed share; each engine pass (pruned, then unpruned when
# comparing) shares the rest, split by stage as (start, share) within the pass.
_LOAD_SHARE, _WRITE_SHARE = 0.05, 0.05
_PASS_STAGES = {"preprocess": (0.0, 0.1), "vision": (0.1, 0.5), "prune": (0.6, 0.1), "answer": (0.7, 0.3)}


@dataclass(frozen=True)
class AskRequest:
    """One question about one volume, with every setting that changes the answer."""

    question: str
    pruning: PruningConfig = field(default_factory=PruningConfig)
    axis: str = "axial"
    window: str = "auto"
    max_slices: int | None = None         # None: the model adapter's recommendation
    max_new_tokens: int = 128
    series_uid: str | None = None
    compare: bool = False                 # also answer without pruning, for a side-by-side

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise InputError("The question is empty.", "Type a question about the volume.")
        if self.axis not in AXES:
            raise InputError(f"Unknown axis {self.axis!r}.", f"Use one of: {', '.join(AXES)}.")
        if self.max_slices is not None and (not isinstance(self.max_slices, int) or not 1 <= self.max_slices <= 1024):
            raise InputError(f"max_slices must be an integer from 1 to 1024, got {self.max_slices!r}.")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InputError(
                f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pruning"] = self.pruning.to_dict()
        return data


class _Progress:
    """Turns the engine's per-stage progress into one overall fraction of the job."""

    def __init__(self, callback: ProgressFn | None, passes: int) -> None:
        self.callback = callback
        self.passes = passes
        self.current_pass = 0

    def __call__(self, stage: str, fraction: float) -> None:
        if self.callback is None:
            return
        if stage == "load":
            overall = _LOAD_SHARE * fraction
        elif stage == "write":
            overall = 1.0 - _WRITE_SHARE + _WRITE_SHARE * fraction
        else:
            start, share = _PASS_STAGES.get(stage, (0.0, 0.0))
            middle = 1.0 - _LOAD_SHARE - _WRITE_SHARE
            overall = _LOAD_SHARE + middle * (self.current_pass + start + share * fraction) / self.passes
        self.callback(stage, min(max(overall, 0.0), 1.0))


@dataclass
class PreparedStack:
    """What a follow-up needs without the volume file: the model slices, their mapping, the prepared volume."""

    stack: Any
    prepared: Any
    settings: dict[str, Any]
    slicing_s: float = 0.0      # reading + slicing the volume, before the engine's own stages

    @property
    def prepare_s(self) -> float:
        """Seconds it took to make this entry: what a follow-up that reuses it does not spend."""
        return self.slicing_s + float(sum(self.prepared.timings.values()))

    @property
    def nbytes(self) -> int:
        from .prepared_cache import prepared_nbytes

        return prepared_nbytes(self.prepared) + int(self.stack.images.nbytes)


def settings_differences(prepared: dict[str, Any], requested: dict[str, Any]) -> str:
    """'pruning.tau 0.9 -> 0.5, axis axial -> coronal': what differs between two preparation settings."""
    def flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in settings.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    old, new = flat(prepared), flat(requested)
    return ", ".join(f"{key} {old.get(key)} -> {new.get(key)}" for key in sorted(old.keys() | new.keys())
                     if old.get(key) != new.get(key))


def preparation_settings(engine, request: AskRequest) -> dict[str, Any]:
    """Everything besides the voxels and geometry that changes the prepared volume."""
    return {
        "model": engine.model_id,
        "axis": request.axis,
        "window": request.window,
        "max_slices": request.max_slices or engine.adapter.default_max_slices,
        "pruning": request.pruning.to_dict(),
        "series_uid": request.series_uid,
    }


def volume_notes(image) -> tuple[bool, list[str]]:
    """(geometry assumed?, notes) that reading the volume attached to it (medpruner.dicom_series)."""
    assumed = image.HasMetaDataKey("medpruner.geometry_assumed") and \
        image.GetMetaData("medpruner.geometry_assumed") == "1"
    notes = image.GetMetaData("medpruner.notes").split("\n") if image.HasMetaDataKey("medpruner.notes") else []
    return assumed, [note for note in notes if note]


def _prepare_stack(engine, volume, request: AskRequest, tracker, stop, cache) -> tuple[str | None, PreparedStack, bool]:
    """Load + slice the volume, then prepare it, or take it from the cache; returns (volume_id, entry, reused)."""
    from .slicing import prepare_slices
    from .volume_io import load_volume, validate_volume

    settings = preparation_settings(engine, request)
    tracker("load", 0.0)
    started = time.perf_counter()
    if isinstance(volume, (str, os.PathLike)):
        image = load_volume(volume, series_uid=request.series_uid)
    else:
        image = validate_volume(volume)
    import SimpleITK as sitk

    geometry = {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
                "direction": image.GetDirection()}
    key = cache.key_for(sitk.GetArrayViewFromImage(image), geometry, settings) if cache is not None else None
    entry = cache.get(key) if cache is not None else None
    if entry is not None:
        tracker("load", 1.0)
        return key, entry, True
    adapter = engine.adapter
    stack = prepare_slices(
        image,
        axis=request.axis,
        window=request.window,
        max_slices=settings["max_slices"],
        size=adapter.preferred_slice_size,
        multiple=adapter.token_pixels,
    )
    stack.geometry_assumed, stack.input_notes = volume_notes(image)
    tracker("load", 1.0)
    slicing_s = time.perf_counter() - started
    if stop():
        raise Cancelled()
    # Keep the prefix's KV cache only where follow-ups can use it; a one-off answer prefills in one pass.
    prepared = engine.prepare(stack.images, request.pruning, progress=tracker, cancel=stop,
                              cache_prefix=cache is not None)
    entry = PreparedStack(stack=stack, prepared=prepared, settings=settings, slicing_s=slicing_s)
    if cache is not None:
        cache.put(key, entry, entry.nbytes)
    return key, entry, False


def run_ask(
    engine,
    volume: str | os.PathLike | Any,
    request: AskRequest,
    out_dir: str | os.PathLike,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    prepared_cache=None,
    volume_id: str | None = None,
    make_parents: bool = True,
    on_text: TextFn | None = None,
) -> dict[str, Any]:
    """Answer `request` about `volume` (a path, or an already loaded SimpleITK image); write OUTPUT_FILES
    into `out_dir`; return the report.

    With a `prepared_cache` (medpruner.prepared_cache.PreparedCache), a volume already prepared with the
    same voxels, geometry and settings is answered from its cached pruned prefix; `volume_id` (the
    report's `volume_id` of an earlier answer) asks about a cached volume without sending it again.
    The volume is read and validated before anything is computed, and nothing is written before the
    answer exists; the four files are written beside `out_dir` and moved in together (`outputs.staged_outputs`),
    so a rejected input, a cancelled job or an interrupted write leaves `out_dir` as it was.
    `on_text(delta, text_so_far)` follows the answer token by token (`MedPruner.ask`); its deltas
    concatenate to the report's "answer". The unpruned answer of `compare` is not streamed.
    """
    from .heatmaps import build_heatmaps, write_image_atomic
    from .overview import render_overview, slice_captions

    stop = cancel or (lambda: False)
    tracker = _Progress(progress, passes=2 if request.compare else 1)
    if volume_id is not None:
        entry = prepared_cache.get(volume_id) if prepared_cache is not None else None
        if entry is None:
            raise UnknownVolume(f"No prepared volume with id {volume_id!r} (it expired or was never made here).",
                                "Send the volume again.")
        requested = preparation_settings(engine, request)
        if entry.settings != requested:
            raise SettingsMismatch("The request's slicing or pruning settings differ from those the volume was "
                                   f"prepared with ({settings_differences(entry.settings, requested)}).",
                                   "Send the volume again with the new settings, or keep the earlier settings.")
        key, reused = volume_id, True
    else:
        key, entry, reused = _prepare_stack(engine, volume, request, tracker, stop, prepared_cache)
    stack, prepared = entry.stack, entry.prepared
    adapter = engine.adapter
    result = engine.ask(prepared, request.question, max_new_tokens=request.max_new_tokens,
                        progress=tracker, cancel=cancel, on_text=on_text)
    if not reused:   # this call did the preparation too: report every stage it ran
        for name in ("preprocess", "vision", "pruning"):
            result.timings[name] = prepared.timings.get(name, 0.0)
        result.timings["prefill"] += prepared.timings.get("prefix", 0.0)
        result.timings["total"] += sum(prepared.timings.values())
    result.prefix_reused = reused
    if tuple(result.image_size) != tuple(stack.images.shape[1:3]):
        raise InputError(
            f"The model's image processor resized the {stack.images.shape[2]}x{stack.images.shape[1]} slices to "
            f"{result.image_size[1]}x{result.image_size[0]}, so heatmaps could not be mapped back exactly.",
            "Check the checkpoint's preprocessor_config.json size limits (min/max pixels).",
        )
    unpruned = None
    if request.compare:
        tracker.current_pass = 1
        unpruned = engine.ask(stack.images, request.question, config=PruningConfig(enabled=False),
                              max_new_tokens=request.max_new_tokens, progress=tracker, cancel=cancel)
    if stop():
        raise Cancelled()

    tracker("write", 0.0)
    kept_image, attention_image = build_heatmaps(stack.mapping, result, adapter.token_pixels)
    report = build_report(engine, request, stack, result, unpruned)
    report["volume_id"] = key
    report["prefix_reused"] = reused
    report["prepare_s"] = round(entry.prepare_s, 4)
    with staged_outputs(Path(out_dir), make_parents=make_parents) as staging:
        write_image_atomic(kept_image, staging / "heatmap_kept.nrrd")
        write_image_atomic(attention_image, staging / "heatmap_attention.nrrd")
        render_overview(stack.images, result, staging / "overview.png", title=request.question, answer=result.answer,
                        axis=request.axis, captions=slice_captions(stack.mapping))
        write_json_atomic(report, staging / "report.json")
        if stop():
            raise Cancelled()
    tracker("write", 1.0)
    return report
