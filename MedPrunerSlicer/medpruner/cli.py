"""`medpruner` command line: demo, ask (and serve, bench when installed).

Exit codes: 0 done, 2 bad input or model (one line saying what is wrong and what to do, nothing
written), 130 interrupted. Progress goes to stderr, results to stdout; on a terminal the answer is
also printed as it is generated, before the summary (never when stdout is piped or with --json).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .config import PruningConfig
from .errors import Cancelled, InputError, MedPrunerError
from .tiny import TINY_FAMILIES, TINY_MODEL

DEMO_QUESTION = "Is there a liver lesion?"
TINY_WARNING = (
    "NOTE: the demo model is a tiny model with RANDOM weights, built on this machine: its answer is "
    "meaningless. It shows the pipeline, the pruning and the heatmaps. For real answers, point "
    "`medpruner ask VOLUME QUESTION --model` at a real checkpoint (e.g. Qwen/Qwen3-VL-2B-Instruct)."
)


class _LiveAnswer:
    """The answer on a terminal as it is generated: an "Answer: " line that grows token by token."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.open = False     # the line is started and not ended yet

    def __call__(self, delta: str, text: str) -> None:
        if not delta:
            return
        if not self.open:
            self.out.write("Answer: ")
            self.open = True
        self.out.write(delta)
        self.out.flush()

    def close(self) -> None:
        if self.open:
            self.out.write("\n")
            self.out.flush()
            self.open = False


class _StderrProgress:
    """One line per stage (and every 25 % of long stages), so logs stay readable."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.stage = None
        self.mark = 0.0
        self.started = time.perf_counter()
        self.live: _LiveAnswer | None = None   # a growing answer line on the same terminal

    def say(self, text: str) -> None:
        if not self.quiet:
            if self.live is not None:
                self.live.close()   # a progress line must not land in the middle of the answer
            print(f"medpruner: {text}", file=sys.stderr, flush=True)

    def __call__(self, stage: str, fraction: float) -> None:
        if stage == "answer" and self.live is not None and self.live.open:
            return   # the growing answer is this stage's progress
        if stage != self.stage:
            self.stage, self.mark = stage, fraction
            self.say(f"[{stage}] {fraction * 100:3.0f}%  ({time.perf_counter() - self.started:.1f} s)")
        elif fraction - self.mark >= 0.25:
            self.mark = fraction
            self.say(f"[{stage}] {fraction * 100:3.0f}%  ({time.perf_counter() - self.started:.1f} s)")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _pruning_from_args(args: argparse.Namespace) -> PruningConfig:
    try:
        return PruningConfig(enabled=not args.no_prune, gamma=args.gamma, tau=args.tau)
    except ValueError as exc:   # name the option the user typed, not the Python field
        raise InputError(str(exc).replace("PruningConfig.", "--")) from None


def _int_within(low: int, high: int):
    """argparse type: an integer from low to high, refused with the option's name before anything runs."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number from {low} to {high}")
        return value
    return parse


def _check_out_dir(path: Path) -> Path:
    """Refuse an --out that cannot hold the outputs before any model is loaded."""
    from .outputs import check_writable_folder

    problem = check_writable_folder(path)
    if problem is not None:
        raise InputError(f"--out {path}: {problem}.",
                         "Give a folder you can write to for the outputs; it is created when missing.")
    return path


def _tiny_model(family: str, progress: _StderrProgress) -> str:
    """The tiny demo checkpoint of `family`: from the cache, or built into it the first time (said which)."""
    from .tiny import ensure_tiny_checkpoint, tiny_checkpoint_path

    if tiny_checkpoint_path(family) is None:
        progress.say(f"[load] building the tiny demo model ({family}; random weights: meaningless answers) once "
                     "into the cache ...")
    else:
        progress.say(f"[load] tiny demo model ({family}; random weights: meaningless answers) from the cache")
    return str(ensure_tiny_checkpoint(family))


def _resolve_model(model: str, progress: _StderrProgress) -> str:
    """'tiny' (when no such folder exists) is the tiny demo model with random weights, built once into the cache."""
    if model == TINY_MODEL and not Path(model).exists():
        return _tiny_model("qwen3_vl", progress)
    return model


def _load_engine(model: str, device: str, dtype: str | None, progress: _StderrProgress):
    model = _resolve_model(model, progress)
    progress.say(f"[load] loading the model from {model} ...")   # before the heavy imports: seconds on a cold disk
    from .checkpoints import check_model_reachable

    check_model_reachable(model)
    from .engine import MedPruner

    _quiet_transformers()
    engine = MedPruner.from_pretrained(model, device=device, dtype=dtype)
    progress.say(f"[load] {engine.adapter.family} on {engine.device} ({str(engine.dtype).replace('torch.', '')})")
    return engine


def _summary(report: dict[str, Any], out_dir: Path) -> str:
    slices, tokens, timings = report["slices"], report["tokens"], report["timings_s"]
    stage_times = " | ".join(f"{k} {timings[k]:.2f} s" for k in ("preprocess", "vision", "pruning", "prefill", "decode"))
    rows = [
        ("Question", report["question"]),
        ("Answer", report["answer"] or "(empty)"),
        *([("DEMO MODEL", "random weights: the answer is meaningless (use --model with a real checkpoint)")]
          if report.get("demo_model") else []),
        ("Model", f"{report['model_id']} ({report['model_family']}, {report['software']['device']}, "
                  f"{report['software']['dtype']})"),
        ("Slices", f"{slices['kept']} kept / {slices['sent']} sent to the model "
                   f"({slices['total']} {report['request']['axis']} slices in the volume)"),
        ("Tokens", f"{tokens['kept_visual']} / {tokens['total_visual']} visual tokens kept "
                   f"({tokens['retention'] * 100:.1f} %)"),
        ("Time", f"{stage_times} | total {timings['total']:.2f} s"),
    ]
    if "unpruned" in report:
        unpruned = report["unpruned"]
        rows.append(("Unpruned", f"{unpruned['answer'] or '(empty)'}  "
                                 f"[{unpruned['counts']['visual_tokens_kept']} visual tokens, "
                                 f"{unpruned['timings_s']['total']:.2f} s]"))
    for note in report["input"].get("notes", []):
        rows.append(("WARNING" if note.startswith("GEOMETRY ASSUMED") else "Note", note))
    rows.append(("Outputs", ", ".join(str(out_dir / name) for name in
                                      ("report.json", "heatmap_kept.nrrd", "heatmap_attention.nrrd", "overview.png"))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _run(args: argparse.Namespace, model: str, volume: Any, question: str) -> int:
    from .pipeline import AskRequest, run_ask
    from .volume_io import load_volume

    progress = _StderrProgress(quiet=args.json)
    request = AskRequest(
        question=question,
        pruning=_pruning_from_args(args),
        axis=args.axis,
        window=args.window,
        max_slices=args.max_slices,
        max_new_tokens=args.max_new_tokens,
        series_uid=getattr(args, "series", None),
        compare=args.compare,
    )
    out_dir = _check_out_dir(Path(args.out))
    if not isinstance(volume, (str, Path)):
        image = volume
    else:
        progress.say(f"[load] volume {volume}")
        image = load_volume(volume, series_uid=request.series_uid)   # refuse a bad volume before loading a model
    engine = _load_engine(model, args.device, args.dtype, progress)
    live = _LiveAnswer(sys.stdout) if not args.json and sys.stdout.isatty() else None
    progress.live = live
    try:
        report = run_ask(engine, image, request, out_dir, progress=progress, on_text=live)
    finally:
        if live is not None:
            live.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_summary(report, out_dir))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    return _run(args, args.model, Path(args.volume), args.question)


def cmd_demo(args: argparse.Namespace) -> int:
    from .phantom import make_phantom_ct

    progress = _StderrProgress(quiet=args.json)
    out_dir = _check_out_dir(Path(args.out))
    model = args.model or _tiny_model(args.family, progress)
    image = make_phantom_ct()
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = out_dir / "sample_ct.nrrd"
    from .heatmaps import write_image_atomic

    write_image_atomic(image, sample)
    progress.say(f"[load] sample CT phantom written to {sample}")
    code = _run(args, model, image, args.question)
    if not args.model and not args.json:
        print("\n" + TINY_WARNING)
        print(f"Open {sample} with {out_dir / 'heatmap_kept.nrrd'} (or heatmap_attention.nrrd) in 3D Slicer "
              "to see the decisions over the slices, or look at overview.png.")
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, parse_slice_counts, run_bench, write_outputs
    from .bench_models import build_bench_engine

    progress = _StderrProgress()
    settings = BenchSettings(slices=parse_slice_counts(args.slices), repeats=args.repeats,
                             max_new_tokens=args.max_new_tokens)
    if args.repeats < 1 or args.max_new_tokens < 2:
        raise InputError("--repeats must be >= 1 and --max-new-tokens >= 2.")
    if args.model:
        engine = _load_engine(args.model, args.device, args.dtype, progress)
    else:
        _quiet_transformers()
        progress.say(f"[load] {args.config} with random weights ...")
        engine = build_bench_engine(args.config, device=args.device, dtype=args.dtype)
    record = run_bench(engine, settings, progress=progress.say)
    paths = write_outputs(record, args.out)
    from .bench import markdown_table

    print(markdown_table(record))
    print("Outputs: " + ", ".join(str(p) for p in paths))
    return 0


def _add_common(parser: argparse.ArgumentParser, out_default: str) -> None:
    pruning = parser.add_argument_group("pruning (MedPruner)")
    pruning.add_argument("--gamma", type=float, default=0.05,
                         help="slice filter: keep a slice when its mean |difference| to the last kept slice "
                              "exceeds this, on normalised pixels (default 0.05; 0 keeps every slice that differs)")
    pruning.add_argument("--tau", type=float, default=0.9,
                         help="token nucleus: keep each slice's smallest set of tokens holding this share of "
                              "attention mass (0-1, default 0.9; 1 keeps every token)")
    pruning.add_argument("--no-prune", action="store_true", help="run the stock model on every slice and token")
    pruning.add_argument("--compare", action="store_true", help="also answer without pruning, for a side-by-side")
    volume = parser.add_argument_group("volume")
    volume.add_argument("--axis", choices=("axial", "coronal", "sagittal"), default="axial",
                        help="slice planes; slices go inferior->superior (axial), posterior->anterior (coronal), "
                             "right->left (sagittal), shown in radiological convention (default axial)")
    volume.add_argument("--window", default="auto",
                        help="auto (CT soft tissue if the volume is in Hounsfield units, else MR 0.5-99.5 "
                             "percentile stretch), ct (= soft-tissue), mr, soft-tissue, lung, bone, brain, "
                             "mediastinum, or W/L like 400/40")
    volume.add_argument("--max-slices", type=_int_within(1, 1024), default=None,
                        help="at most this many evenly spaced slices go to the model (default: the model's "
                             "recommendation, 32 for Qwen3-VL)")
    model = parser.add_argument_group("model")
    model.add_argument("--max-new-tokens", type=_int_within(1, 4096), default=128,
                       help="longest answer in tokens (default 128)")
    model.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    model.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="weights dtype (default: the checkpoint's own)")
    parser.add_argument("--out", default=out_default, help=f"output directory (default {out_default})")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpruner",
        description="Ask a vision-language model about a CT/MR volume, with MedPruner token pruning and "
                    "heatmaps of what the model kept.",
    )
    parser.add_argument("--version", action="version", version=f"medpruner {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the whole pipeline on the tiny demo model and a sample CT phantom",
                               description=TINY_WARNING)
    demo.add_argument("--question", default=DEMO_QUESTION, help=f"question (default {DEMO_QUESTION!r})")
    demo.add_argument("--family", default="qwen3_vl", choices=TINY_FAMILIES, help="tiny model family")
    demo.add_argument("--model", default=None, help="use this checkpoint instead of the tiny demo model")
    _add_common(demo, "medpruner-demo")
    demo.set_defaults(func=cmd_demo)

    ask = commands.add_parser("ask", help="ask a question about a volume file or DICOM series folder")
    ask.add_argument("volume", help="NRRD, NIfTI (.nii/.nii.gz), MHA/MHD file, or a DICOM series folder")
    ask.add_argument("question", help="the question, in quotes")
    ask.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. Qwen/Qwen3-VL-2B-Instruct), or tiny for the demo model")
    ask.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when the folder holds several series")
    _add_common(ask, "medpruner-out")
    ask.set_defaults(func=cmd_ask)

    from .server.cli import add_serve_parser

    add_serve_parser(commands)

    from .bench_models import BENCH_CONFIGS

    bench = commands.add_parser(
        "bench", help="measure time to the whole answer (and to its first token) with and without pruning, as ratios in one run",
        description="Times full (stock model), pruned, reference-style (encode all, then prune) and ideal "
                    "(stock encoder on kept slices + stock prefill on kept tokens) runs, interleaved, at the "
                    "model's own decisions and at fixed operating points (50% of slices, 10%/5% of tokens).")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="a real checkpoint directory or hub id")
    source.add_argument("--config", default="tiny", choices=BENCH_CONFIGS,
                        help="a published architecture with random weights (default tiny)")
    bench.add_argument("--slices", default="16,32,64", help="numbers of slices, comma-separated (default 16,32,64)")
    bench.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (default 5)")
    bench.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per run (default 16)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    bench.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="default: bfloat16 on CUDA, float32 on CPU (checkpoint's own with --model)")
    bench.add_argument("--out", default="bench", help="output directory (default bench)")
    bench.set_defaults(func=cmd_bench)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)   # `kill` stops a run as cleanly as Ctrl-C
    try:
        return args.func(args)
    except Cancelled:
        print("medpruner: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("medpruner: interrupted; no partial outputs were left", file=sys.stderr)
        return 130
    except MedPrunerError as exc:
        hint = f" -- {exc.hint}" if exc.hint else ""
        print(f"medpruner: error: {exc.message}{hint}", file=sys.stderr)
        return 2
    except ValueError as exc:   # PruningConfig and other argument validation
        print(f"medpruner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
