"""`medpruner bench`: what pruning buys, as ratios measured in one run, interleaved so noise hits all modes.

Modes, for each number of slices and each operating point:
  full       the stock model's `generate` on every slice and token (no engine code at all);
  pruned     the engine with MedPruner (dropped slices never encoded);
  reference  every slice encoded, then pruned (what the published code does);
  ideal      the stock vision encoder on the kept slices only and the stock language-model prefill on
             the kept tokens only, with no scoring or selection work: the limit for this method.
Operating points: "natural" (the model's own decisions) and fixed ones supplied as masks (a share of
slices kept, and a share of each slice's tokens), so the speed-up is measured where the paper
operates even with random weights. TTFT excludes the image processor's CPU work, which is the
same for every mode; it is vision + pruning + prefill. Time to answer (TTA), the headline, is TTFT
plus decoding the whole answer (max_new_tokens tokens, EOS ignored). The engine modes decode with
the engine's decoder (`BenchSettings.decode`; static cache and CUDA graphs on CUDA by default), the
stock mode with the stock `generate`; each mode's `decode_path` says which ran.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_atomic
from .config import PruningConfig

OPERATING_POINTS: tuple[tuple[str, float | None, float | None], ...] = (
    ("natural", None, None),
    ("s50-t10", 0.5, 0.10),
    ("s50-t5", 0.5, 0.05),
)
ENGINE_MODES = ("pruned", "reference", "ideal")
BENCH_QUESTION = "Is there a liver lesion?"
FOLLOWUP_QUESTION = "Where is it, and how large is it?"


@dataclass(frozen=True)
class BenchSettings:
    slices: tuple[int, ...] = (16, 32, 64)
    repeats: int = 5
    max_new_tokens: int = 16
    operating_points: tuple[tuple[str, float | None, float | None], ...] = OPERATING_POINTS
    question: str = BENCH_QUESTION
    decode: str = "auto"          # the engine's decoder (MedPruner.ask's `decode`)

STOCK_DECODE_PATH = "stock generate (dynamic-cache, eager)"


class _Timer:
    """Wall-clock marks that first wait for the accelerator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def mark(self) -> Any:
        """A point in time that does not wait for the accelerator: a recorded CUDA event, or the clock on CPU."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (the events must have completed: call `now` first)."""
        if self.device.type == "cuda":
            return start.elapsed_time(end) / 1000.0
        return end - start


def _slice_mask(count: int, share: float | None) -> np.ndarray | None:
    """Evenly spread kept slices (slice 0 always), round(share * count) of them."""
    if share is None:
        return None
    keep = max(1, round(share * count))
    mask = np.zeros(count, dtype=bool)
    mask[np.unique(np.round(np.linspace(0, count - 1, keep)).astype(int))] = True
    return mask


def _bench_images(engine, count: int) -> np.ndarray:
    """`count` slices of the CT phantom, soft-tissue window, at the model's preferred square size.

    Made without the volume layer (no SimpleITK), so the benchmark runs on a bare GPU box.
    """
    from PIL import Image

    from .phantom import phantom_ct_array

    side = engine.adapter.preferred_slice_size
    hounsfield = phantom_ct_array(shape=(count, 256, 256)).astype(np.float32)
    grey = (np.clip((hounsfield - (40 - 200)) / 400, 0, 1) * 255).round().astype(np.uint8)
    resized = np.stack([np.asarray(Image.fromarray(plane).resize((side, side), Image.BILINEAR)) for plane in grey])
    return np.repeat(resized[..., None], 3, axis=-1)


def _measure(result, ttft_extra: float = 0.0) -> dict[str, Any]:
    t = result.timings
    ttft = t["vision"] + t["pruning"] + t["prefill"] + ttft_extra
    decoded = max(len(result.token_ids) - 1, 1)
    return {
        "tta_s": ttft + t["decode"],
        "ttft_s": ttft,
        "vision_s": t["vision"],
        "pruning_s": t["pruning"],
        "prefill_s": t["prefill"],
        "decode_s": t["decode"],
        "decode_tokens_per_s": decoded / t["decode"] if t["decode"] > 0 else None,
        "peak_memory_bytes": result.peak_memory_bytes,
        "slices_kept": result.counts["slices_kept"],
        "slices_total": result.counts["slices_total"],
        "visual_tokens_kept": result.counts["visual_tokens_kept"],
        "visual_tokens_total": result.counts["visual_tokens_total"],
        "prompt_tokens": result.counts["prompt_tokens_pruned"],
        "generated_tokens": len(result.token_ids),
        "decode_path": result.decode_path,
    }


def _run_full(engine, pixels, input_ids, settings: BenchSettings, timer: _Timer) -> dict[str, Any]:
    """The stock model's generate, timed from inside without a host sync per step: the vision
    encoder's hooks and the first call of a logits processor record CUDA events (clock readings on
    CPU); the answer's end is read after `generate` returns. (The processor used to synchronise the
    device at every step, which the stock path paid for as an extra host sync per token.)"""
    from transformers import LogitsProcessor, LogitsProcessorList

    marks: list[Any] = []
    vision: list[Any] = []
    steps = [0]

    class FirstTokenMark(LogitsProcessor):
        def __call__(self, input_ids, scores):
            steps[0] += 1
            if not marks:
                marks.append(timer.mark())
            return scores

    visual = engine.adapter.vision_encoder
    hooks = [visual.register_forward_pre_hook(lambda *a: vision.append(timer.mark())),
             visual.register_forward_hook(lambda *a: vision.append(timer.mark()))]
    inputs = engine.adapter.stock_inputs(pixels, input_ids)
    count = settings.max_new_tokens
    timer.reset_peak()
    try:
        timer.now()
        start = timer.mark()
        with torch.inference_mode():
            engine.model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                  logits_processor=LogitsProcessorList([FirstTokenMark()]))
        end = timer.mark()
        timer.now()
    finally:
        for hook in hooks:
            hook.remove()
    ttft = timer.seconds(start, marks[0])
    tta = timer.seconds(start, end)
    vision_s = timer.seconds(vision[0], vision[1])
    decode = tta - ttft
    tokens_total = int(engine.adapter.image_token_mask(input_ids).sum())
    return {
        "tta_s": tta,
        "ttft_s": ttft,
        "vision_s": vision_s,
        "pruning_s": 0.0,
        "prefill_s": ttft - vision_s,
        "decode_s": decode,
        "decode_tokens_per_s": (steps[0] - 1) / decode if decode > 0 and steps[0] > 1 else None,
        "peak_memory_bytes": timer.peak(),
        "slices_kept": pixels.num_slices,
        "slices_total": pixels.num_slices,
        "visual_tokens_kept": tokens_total,
        "visual_tokens_total": tokens_total,
        "prompt_tokens": int(input_ids.shape[1]),
        "generated_tokens": steps[0],
        "decode_path": STOCK_DECODE_PATH,
    }


def _run_engine(engine, images, op, settings: BenchSettings, timer: _Timer, encode_dropped: bool):
    """A fresh pruned ask (vision, selection, prefix and question prefill all timed by the engine)."""
    name, slice_share, token_share = op
    timer.reset_peak()
    return engine.ask(images, settings.question, PruningConfig(), max_new_tokens=settings.max_new_tokens,
                      ignore_eos=True, decode=settings.decode, slice_mask=_slice_mask(len(images), slice_share),
                      token_budget=token_share, encode_dropped=encode_dropped)


def _run_ideal(engine, pixels, pruned, settings: BenchSettings, timer: _Timer):
    """Stock encoder on kept slices, kept tokens gathered by the known masks, one stock prefill: no selection."""
    from .engine import PreparedVolume

    adapter = engine.adapter
    kept = np.flatnonzero(pruned.slice_kept).tolist()
    per_slice = pixels.token_grid[0] * pixels.token_grid[1]
    visual_keep = np.zeros((len(pruned.slice_kept), per_slice), dtype=bool)
    for s in kept:
        visual_keep[s] = pruned.token_role[s].ravel() > 0
    keep = torch.from_numpy(visual_keep[kept]).to(adapter.device)
    timer.reset_peak()
    start = timer.now()
    with torch.inference_mode():
        features = adapter.encode(adapter.subset(pixels, kept), capture=False)
        embeds = features.embeds[keep]
        token_features = {name: [layer[keep] for layer in layers] for name, layers in features.token_features.items()}
    vision = timer.now() - start
    ideal = PreparedVolume(
        pixels=pixels, config=PruningConfig(), slice_kept=pruned.slice_kept, slice_l1=pruned.slice_l1,
        token_scores=pruned.token_scores, token_role=pruned.token_role,
        visual_keep=torch.from_numpy(visual_keep.reshape(-1)), visual_embeds=embeds, visual_features=token_features,
    )
    result = engine.ask(ideal, settings.question, max_new_tokens=settings.max_new_tokens, ignore_eos=True,
                        decode=settings.decode)
    result.timings["vision"] = vision
    return result


def _run_followup(engine, prepared, settings: BenchSettings, timer: _Timer):
    """A follow-up question on an already prepared volume: only the question is prefilled."""
    timer.reset_peak()
    return engine.ask(prepared, FOLLOWUP_QUESTION, max_new_tokens=settings.max_new_tokens, ignore_eos=True,
                      decode=settings.decode)


def _stats(values: list[float | None]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "min": float(min(values)), "max": float(max(values)),
            "q1": float(q1), "q3": float(q3)}


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("tta_s", "ttft_s", "vision_s", "pruning_s", "prefill_s", "decode_s", "decode_tokens_per_s",
            "peak_memory_bytes")
    summary = {key: _stats([run[key] for run in runs]) for key in keys}
    for key in ("slices_kept", "slices_total", "visual_tokens_kept", "visual_tokens_total", "prompt_tokens",
                "generated_tokens"):
        summary[key] = runs[-1][key]
    paths = sorted({run["decode_path"] for run in runs})
    summary["decode_path"] = paths[0] if len(paths) == 1 else " | ".join(paths)
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(modes: dict[str, Any], op_name: str) -> dict[str, float | None]:
    med = {m: modes[m]["ttft_s"]["median"] for m in modes}
    full, pruned = med["full"], med[f"pruned:{op_name}"]
    reference, ideal = med[f"reference:{op_name}"], med[f"ideal:{op_name}"]
    p, i, f = modes[f"pruned:{op_name}"], modes[f"ideal:{op_name}"], modes["full"]
    tta = {m: modes[m]["tta_s"]["median"] for m in modes}
    return {
        "full_over_pruned_tta": _ratio(tta["full"], tta[f"pruned:{op_name}"]),
        "pruned_over_ideal_tta": _ratio(tta[f"pruned:{op_name}"], tta[f"ideal:{op_name}"]),
        "reference_over_pruned_tta": _ratio(tta[f"reference:{op_name}"], tta[f"pruned:{op_name}"]),
        "decode_speed_pruned_over_full": _ratio(p["decode_tokens_per_s"]["median"], f["decode_tokens_per_s"]["median"]),
        "full_over_pruned": _ratio(full, pruned),
        "pruned_over_ideal": _ratio(pruned, ideal),
        "reference_over_pruned": _ratio(reference, pruned),
        "overhead_share_of_pruned_ttft": _ratio(pruned - ideal, pruned) if pruned and ideal else None,
        "selection_share_of_pruned_ttft": _ratio(p["pruning_s"]["median"], pruned),
        "vision_pruned_over_full": _ratio(p["vision_s"]["median"], f["vision_s"]["median"]),
        "kept_slice_share": _ratio(p["slices_kept"], p["slices_total"]),
        "peak_memory_pruned_over_ideal": _ratio(p["peak_memory_bytes"]["median"], i["peak_memory_bytes"]["median"]),
        "visual_token_share": _ratio(p["visual_tokens_kept"], p["visual_tokens_total"]),
    }


def _followup_ratios(modes: dict[str, Any]) -> dict[str, float | None]:
    followup = modes["followup:natural"]["ttft_s"]["median"]
    followup_tta = modes["followup:natural"]["tta_s"]["median"]
    return {
        "fresh_pruned_over_followup_tta": _ratio(modes["pruned:natural"]["tta_s"]["median"], followup_tta),
        "full_over_followup_tta": _ratio(modes["full"]["tta_s"]["median"], followup_tta),
        "fresh_pruned_over_followup": _ratio(modes["pruned:natural"]["ttft_s"]["median"], followup),
        "full_over_followup": _ratio(modes["full"]["ttft_s"]["median"], followup),
    }


def run_bench(engine, settings: BenchSettings, progress=None) -> dict[str, Any]:
    """Measure every mode at every slice count and operating point; return the JSON-ready record."""
    adapter = engine.adapter
    timer = _Timer(engine.device)
    say = progress or (lambda text: None)
    results = []
    for count in settings.slices:
        images = _bench_images(engine, count)
        pixels = adapter.preprocess(list(images))
        h, w = pixels.token_grid
        input_ids = adapter.prompt_ids(count, h * w, settings.question)
        runs: dict[str, list[dict[str, Any]]] = {}
        used_masks: dict[str, Any] = {}
        prepared_natural = engine.prepare(images, PruningConfig())   # for follow-ups; not timed
        for repeat in range(settings.repeats + 1):   # repeat 0 warms up and is not recorded
            say(f"{count} slices: repeat {repeat}/{settings.repeats}{' (warm-up)' if repeat == 0 else ''}")
            measured = {"full": _run_full(engine, pixels, input_ids, settings, timer)}
            for op in settings.operating_points:
                name = op[0]
                pruned = _run_engine(engine, images, op, settings, timer, encode_dropped=False)
                measured[f"pruned:{name}"] = _measure(pruned)
                reference = _run_engine(engine, images, op, settings, timer, encode_dropped=True)
                measured[f"reference:{name}"] = _measure(reference)
                measured[f"ideal:{name}"] = _measure(_run_ideal(engine, pixels, pruned, settings, timer))
                used_masks[name] = {
                    "supplied_slice_mask": None if op[1] is None else _slice_mask(count, op[1]).tolist(),
                    "supplied_token_share": op[2],
                    "engine_slice_kept": pruned.slice_kept.tolist(),
                    "engine_tokens_kept_per_slice": [0 if r is None else int((r > 0).sum()) for r in pruned.token_role],
                    "reference_decisions_equal": bool(
                        np.array_equal(reference.slice_kept, pruned.slice_kept)
                        and all((a is None and b is None) or np.array_equal(a, b)
                                for a, b in zip(reference.token_role, pruned.token_role))
                    ),
                }
            followup = _run_followup(engine, prepared_natural, settings, timer)
            measured["followup:natural"] = _measure(followup)
            if repeat:
                for mode, run in measured.items():
                    runs.setdefault(mode, []).append(run)
        modes = {mode: _summarise(mode_runs) for mode, mode_runs in runs.items()}
        results.append({
            "slices": count,
            "tokens_per_slice": h * w,
            "modes": modes,
            "ratios": {op[0]: _ratios(modes, op[0]) for op in settings.operating_points},
            "followup": _followup_ratios(modes),
            "masks": used_masks,
            "raw": runs,
        })
    last_modes = results[-1]["modes"] if results else {}
    return {
        "schema": "medpruner.bench/1",
        "decode_path": last_modes.get("pruned:natural", {}).get("decode_path"),
        "stock_decode_path": STOCK_DECODE_PATH,
        "model_id": engine.model_id,
        "model_family": adapter.family,
        "device": _device_name(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "settings": {**asdict(settings), "slices": list(settings.slices)},
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "results": results,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


# Repeats whose TTFT interquartile range exceeds this share of the median make a ratio unreliable.
NOISE_LIMIT = 0.25


def noisy_measurements(record: dict[str, Any], limit: float = NOISE_LIMIT) -> list[str]:
    """'16 slices, pruned:natural (+-41 %)' for every mode whose repeats (of TTA or TTFT, the wider)
    disagree by more than `limit`."""
    noisy = []
    for entry in record["results"]:
        for mode, summary in entry["modes"].items():
            spreads = [(t["q3"] - t["q1"]) / t["median"] for t in (summary.get("tta_s"), summary["ttft_s"])
                       if t and t["median"] and t["q3"] is not None and t["q1"] is not None]
            spread = max(spreads, default=0.0)
            if spread > limit:
                noisy.append(f"{entry['slices']} slices, {mode} (+-{spread * 50:.0f} %)")
    return noisy


def noise_warning(record: dict[str, Any]) -> str | None:
    """A sentence for the table and the terminal when the repeats disagree, else None."""
    noisy = noisy_measurements(record)
    if not noisy:
        return None
    shown = "; ".join(noisy[:6]) + (f"; and {len(noisy) - 6} more" if len(noisy) > 6 else "")
    return (f"Warning: the repeats disagree by more than {NOISE_LIMIT * 100:.0f} % of the median (interquartile "
            f"range) for {shown}. The machine was busy or the runs too short: rerun on an idle machine with more "
            "--repeats before trusting these ratios.")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(record: dict[str, Any]) -> str:
    """The README-ready tables: time to answer first (the headline), then time to first token, then follow-ups."""
    warning = noise_warning(record)
    settings = record["settings"]
    engine_path = record.get("decode_path") or "-"
    stock_path = record.get("stock_decode_path") or STOCK_DECODE_PATH
    lines = [
        f"Model: {record['model_id']} on {record['device']} ({record['dtype']}), "
        f"{settings['repeats']} repeats, {settings['max_new_tokens']} new tokens. "
        "TTA (time to answer) = TTFT + decoding every answer token; TTFT = vision + pruning + prefill; medians in ms. "
        f"Decoding: engine modes {engine_path}, full (stock) {stock_path}.",
        *(["", f"**{warning}**"] if warning else []),
        "",
        "| slices | operating point | slices kept | visual tokens kept | TTA full | pruned | reference | ideal "
        "| full/pruned | pruned/ideal | decode tok/s full | pruned |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in record["results"]:
        modes = entry["modes"]
        for op, ratios in entry["ratios"].items():
            p = modes[f"pruned:{op}"]
            lines.append(
                f"| {entry['slices']} | {op} | {p['slices_kept']}/{p['slices_total']} "
                f"| {_pct(ratios['visual_token_share'])} "
                f"| {_ms(modes['full']['tta_s']['median'])} | {_ms(p['tta_s']['median'])} "
                f"| {_ms(modes[f'reference:{op}']['tta_s']['median'])} | {_ms(modes[f'ideal:{op}']['tta_s']['median'])} "
                f"| {_x(ratios['full_over_pruned_tta'])} | {_x(ratios['pruned_over_ideal_tta'])} "
                f"| {_rate(modes['full']['decode_tokens_per_s']['median'])} | {_rate(p['decode_tokens_per_s']['median'])} |"
            )
    lines += [
        "",
        "Time to first token, median in ms:",
        "",
        "| slices | operating point | slices kept | visual tokens kept | TTFT full | pruned | reference | ideal "
        "| full/pruned | pruned/ideal | reference/pruned | overhead | vision pruned/full | peak mem pruned/ideal |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in record["results"]:
        modes = entry["modes"]
        for op, ratios in entry["ratios"].items():
            p = modes[f"pruned:{op}"]
            lines.append(
                f"| {entry['slices']} | {op} | {p['slices_kept']}/{p['slices_total']} "
                f"| {_pct(ratios['visual_token_share'])} "
                f"| {_ms(modes['full']['ttft_s']['median'])} | {_ms(p['ttft_s']['median'])} "
                f"| {_ms(modes[f'reference:{op}']['ttft_s']['median'])} | {_ms(modes[f'ideal:{op}']['ttft_s']['median'])} "
                f"| {_x(ratios['full_over_pruned'])} | {_x(ratios['pruned_over_ideal'])} "
                f"| {_x(ratios['reference_over_pruned'])} | {_pct(ratios['overhead_share_of_pruned_ttft'])} "
                f"| {_x(ratios['vision_pruned_over_full'])} | {_x(ratios['peak_memory_pruned_over_ideal'])} |"
            )
    lines += [
        "",
        "Follow-up question on the same volume (pruned visual prefix and its KV cache reused), medians in ms:",
        "",
        "| slices | follow-up TTA | TTFT | fresh pruned TTA | full (stock) TTA | fresh/follow-up TTA "
        "| full/follow-up TTA | full/follow-up TTFT |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in record["results"]:
        modes, ratios = entry["modes"], entry["followup"]
        followup = modes["followup:natural"]
        lines.append(
            f"| {entry['slices']} | {_ms(followup['tta_s']['median'])} | {_ms(followup['ttft_s']['median'])} "
            f"| {_ms(modes['pruned:natural']['tta_s']['median'])} | {_ms(modes['full']['tta_s']['median'])} "
            f"| {_x(ratios['fresh_pruned_over_followup_tta'])} | {_x(ratios['full_over_followup_tta'])} "
            f"| {_x(ratios['full_over_followup'])} |"
        )
    return "\n".join(lines) + "\n"


def _plots(record: dict[str, Any], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    ops = list(record["results"][0]["ratios"])
    counts = [entry["slices"] for entry in record["results"]]
    paths = []
    for key, name, label in (("tta_s", "bench_tta.png", "time to answer (ms)"),
                             ("ttft_s", "bench_ttft.png", "time to first token (ms)")):
        fig = Figure(figsize=(4.2 * len(ops), 3.6), layout="constrained")
        axes = fig.subplots(1, len(ops), squeeze=False)[0]
        for ax, op in zip(axes, ops):
            for mode in ("full", *[f"{m}:{op}" for m in ENGINE_MODES]):
                med = [e["modes"][mode][key]["median"] * 1000 for e in record["results"]]
                low = [e["modes"][mode][key]["q1"] * 1000 for e in record["results"]]
                high = [e["modes"][mode][key]["q3"] * 1000 for e in record["results"]]
                ax.plot(counts, med, marker="o", label=mode.split(":")[0])
                ax.fill_between(counts, low, high, alpha=0.2)
            ax.set_title(f"operating point: {op}")
            ax.set_xlabel("slices")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{record['model_id']} on {record['device']}")
        paths.append(write_atomic(out / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110), ".png"))

    last = record["results"][-1]
    op = ops[-1]
    modes = ["full", *[f"{m}:{op}" for m in ENGINE_MODES]]
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(modes))
    for stage in ("vision_s", "pruning_s", "prefill_s", "decode_s"):
        values = np.array([last["modes"][m][stage]["median"] * 1000 for m in modes])
        ax.bar([m.split(":")[0] for m in modes], values, bottom=bottom, label=stage[:-2])
        bottom += values
    ax.set_ylabel("ms (median)")
    ax.set_title(f"Time to answer by stage, {last['slices']} slices, {op}")
    ax.legend()
    paths.append(write_atomic(out / "bench_split.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110), ".png"))
    return paths


def write_outputs(record: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """bench.json, bench.md, bench_tta.png, bench_ttft.png and bench_split.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    paths = [write_atomic(out / "bench.json", lambda tmp: Path(tmp).write_text(text), ".json")]
    table = markdown_table(record)
    paths.append(write_atomic(out / "bench.md", lambda tmp: Path(tmp).write_text(table), ".md"))
    paths.extend(_plots(record, out))
    return paths


def parse_slice_counts(text: str) -> tuple[int, ...]:
    """"16,32,64" -> (16, 32, 64), each from 1 to 1024."""
    from .errors import InputError

    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or any(not 1 <= c <= 1024 for c in counts):
        raise InputError(f"--slices {text!r} is not a list of slice counts.", "Use e.g. --slices 16,32,64.")
    return counts

