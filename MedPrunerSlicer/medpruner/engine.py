"""MedPruner: a stock transformers VLM answering questions about a slice stack, with MedPruner pruning.

Flow of `ask`: slices -> the checkpoint's image processor -> stage 1 slice filter on the normalised
pixels -> the stock vision encoder on the KEPT slices only (dropped slices are never encoded), with
the last block's attention captured by hooks -> stage 2 nucleus + contextual merge per slice ->
the stock language model on the kept tokens at their ORIGINAL rotary positions -> greedy decoding.
The selection does not depend on the question, so `prepare` holds everything before the prompt.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import SUPPORTED_FAMILIES, ModelAdapter, SlicePixels, adapter_for
from .config import PruningConfig
from .checkpoints import _local_checkpoint
from .errors import Cancelled, InputError, ModelLoadError
from .pruning import select_tokens, slice_filter
from .result import AskResult

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]
TextFn = Callable[[str, str], None]   # (delta, answer so far)

MAX_QUESTION_CHARS = 4000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# Any question will do to find the prompt's visual prefix: it ends at the last visual token.
_PREFIX_PROBE_QUESTION = "?"


@dataclass
class PrefixCache:
    """The language model's KV cache of the kept tokens of the prompt's visual prefix."""

    ids: torch.Tensor       # (1, P) ids of the FULL prompt's prefix (up to its last visual token)
    cache: Any              # the stock model's cache object holding the kept prefix tokens
    kept_length: int        # tokens in the cache
    # Position of the first text token after the prefix, when text there takes consecutive positions
    # from it in every row (checked on the probe prompt); None: positions come from the full prompt.
    text_position: int | None = None


@dataclass
class PreparedVolume:
    """Everything about a slice stack that does not depend on the question, KV cache of its prefix included."""

    pixels: SlicePixels
    config: PruningConfig
    slice_kept: np.ndarray
    slice_l1: np.ndarray
    token_scores: list[np.ndarray | None]
    token_role: list[np.ndarray | None]
    visual_keep: torch.Tensor                   # (S * n,) bool over every visual token of the full prompt
    visual_embeds: torch.Tensor                 # (n_kept, D) merged embeddings of the kept visual tokens
    visual_features: dict[str, list[torch.Tensor]]
    timings: dict[str, float] = field(default_factory=dict)
    prefix: PrefixCache | None = None

    @property
    def num_slices(self) -> int:
        return int(self.slice_kept.shape[0])

    @property
    def tokens_per_slice(self) -> int:
        h, w = self.pixels.token_grid
        return h * w


def _as_images(slices: Any) -> list[np.ndarray]:
    """Validate the caller's slices and return them as a list of (H, W, 3) uint8 arrays (no copies of RGB input)."""
    if isinstance(slices, np.ndarray):
        if slices.dtype != np.uint8:
            raise InputError(
                f"Slices must be uint8, got {slices.dtype}.",
                "Window and scale the volume to 0-255 first (medpruner's volume layer does this).",
            )
        if slices.ndim == 3:
            slices = np.repeat(slices[..., None], 3, axis=-1)
        if slices.ndim != 4 or slices.shape[-1] != 3:
            raise InputError(
                f"Slices must have shape (S, H, W) or (S, H, W, 3), got {slices.shape}.",
                "Pass a stack of grey or RGB slices.",
            )
        if slices.shape[0] < 1 or min(slices.shape[1:3]) < 1:
            raise InputError(f"The slice stack is empty (shape {slices.shape}).", "Pass at least one slice.")
        return list(slices)
    if isinstance(slices, Sequence) and not isinstance(slices, (str, bytes)):
        if len(slices) == 0:
            raise InputError("No slices were given.", "Pass at least one slice.")
        images = []
        for index, item in enumerate(slices):
            if not hasattr(item, "convert"):
                raise InputError(
                    f"Slice {index} is a {type(item).__name__}, not a PIL image.",
                    "Pass a numpy uint8 array (S, H, W[, 3]) or a list of PIL images.",
                )
            images.append(np.asarray(item.convert("RGB")))
        if len({im.shape for im in images}) != 1:
            raise InputError("All slices must have the same size.", "Resample the slices to one size first.")
        return images
    raise InputError(
        f"Slices must be a numpy array or a list of PIL images, got {type(slices).__name__}.",
        "Pass a numpy uint8 array (S, H, W[, 3]) or a list of PIL images.",
    )


def _checked_slice_mask(mask: Any, count: int) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (count,) or not mask.any():
        raise InputError(f"slice_mask must be {count} booleans with at least one True, got shape {mask.shape}.")
    return mask


def _check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InputError("The question is empty.", "Type a question about the volume.")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(
            f"The question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}.",
            "Ask a shorter question.",
        )
    return question


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "CUDA was requested but this PyTorch cannot use a CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}).",
            "Use --device cpu, or install a CUDA build of PyTorch that matches your driver.",
        )
    return device


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}.", f"Use one of: auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


class _Clock:
    """Stage timer that waits for the accelerator, so a stage's time is really that stage's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


class TextStream:
    """The answer's text as it grows, token by token, in O(1) work per token.

    Each token's text is the difference between decoding a short window of trailing ids with and
    without it (the window starts where the text last was complete), so a byte-level token that
    ends in the middle of a character (decodes to U+FFFD) is held back until the character is
    complete. The deltas concatenate exactly to `decode(ids, skip_special_tokens=True).strip()`:
    leading whitespace is never emitted and trailing whitespace is held until text follows it.
    """

    # Ids kept pending while the window's text ends in U+FFFD: far more than a character's bytes,
    # so only bytes that can never form a character get emitted (as U+FFFD) when it is reached.
    HOLD_LIMIT = 16

    def __init__(self, tokenizer: Any, on_text: TextFn | None = None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""            # what was emitted: always a prefix of the final answer
        self._start = 0           # window start: the text was complete up to here
        self._read = 0            # ids before this are in the emitted (or held) text
        self._held = ""           # trailing whitespace not emitted yet

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int, last: bool = False) -> str:
        """Add a generated token; returns (and passes to on_text) the new text, possibly ""."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self._start:self._read])
        after = self._decode(self.ids[self._start:])
        delta = ""
        pending = len(self.ids) - self._read
        if last or not after.endswith("\ufffd") or pending >= self.HOLD_LIMIT:
            raw = self._held + after[len(before):]
            self._start, self._read = self._read, len(self.ids)
            if not self.text:
                raw = raw.lstrip()
            body = raw.rstrip()
            self._held = "" if last else raw[len(body):]
            delta = body
            self.text += delta
        if self.on_text is not None:
            self.on_text(delta, self.text)
        return delta


# How `ask` decodes. "auto": "cuda-graph" on CUDA, "static" elsewhere.
DECODE_MODES = ("auto", "cuda-graph", "static", "dynamic")
DECODE_PATHS = {
    "cuda-graph": "static-cache+cuda-graph",
    "static": "static-cache",
    "dynamic": "dynamic-cache (eager)",
}


class _DynamicDecoder:
    """The reference decoder: the stock dynamic cache, one eager step per token (`adapter.decode_step`)."""

    path = DECODE_PATHS["dynamic"]

    def __init__(self, adapter: ModelAdapter, cache: Any, logits: torch.Tensor, position: int) -> None:
        self.adapter, self.cache, self.logits, self.position = adapter, cache, logits, position

    def first(self) -> int:
        return int(torch.argmax(self.logits[-1]))

    def launch(self, token: int) -> None:
        self.logits = self.adapter.decode_step(token, self.position, self.cache)[None]
        self.position += 1

    def read(self) -> int:
        return int(torch.argmax(self.logits[-1]))


class _StaticDecoder:
    """Greedy decoding on a static cache, the next token and its position kept on the device.

    One step (`_step`) reads the token and position buffers, runs the stock language model on the
    preallocated cache, and writes the next token and position back in place: no host transfer and
    no shape that changes, so on CUDA the step is captured once as a CUDA graph and replayed for
    every later token (after WARMUP eager steps on a side stream, as CUDA graphs require). The host
    reads each token once (`read`), after the next step is already queued (`launch`), so reading
    and the caller's per-token work overlap the GPU. Greedy ids are those of `_DynamicDecoder`.
    """

    WARMUP = 2

    def __init__(self, adapter: ModelAdapter, cache: Any, logits: torch.Tensor, position: int,
                 use_graph: bool) -> None:
        self.adapter, self.cache = adapter, cache
        device = logits.device
        self.ids = torch.argmax(logits[-1]).reshape(1, 1)
        self.positions = torch.full((adapter.position_rows, 1), position, dtype=torch.long, device=device)
        self.use_graph = use_graph and device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.use_graph else None
        self.graph: Any = None
        self.launched = 0
        self.path = DECODE_PATHS["static"]   # until a graph is captured

    def _step(self) -> None:
        logits = self.adapter.extend(self.ids, self.positions, self.cache)
        self.ids.copy_(torch.argmax(logits[-1]).reshape(1, 1))
        self.positions.add_(1)

    def first(self) -> int:
        """The first answer token (the prefill's argmax), read once."""
        return int(self.ids)

    def launch(self, token: int) -> None:
        """Queue the step after `token` (already in the device buffer: the argument is not read)."""
        self.launched += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.use_graph and self.launched <= self.WARMUP:
            current = torch.cuda.current_stream(self.ids.device)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                self._step()
            current.wait_stream(self.side)
        elif self.use_graph:
            self._capture()
        else:
            self._step()

    def _capture(self) -> None:
        """Capture one step (capturing runs nothing), then replay it; eager steps if capture fails.

        `capture_begin`/`capture_end` rather than `torch.cuda.graph`, which empties the allocator's
        cache first: the next ask's vision and prefill would then pay for fresh device allocations.
        """
        device = self.ids.device
        graph = torch.cuda.CUDAGraph()
        self.side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(self.side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._step()
                finally:
                    graph.capture_end()
        except RuntimeError as exc:      # an op of the stock step that a graph cannot hold
            torch.cuda.synchronize(device)
            self.use_graph = False
            self.path = f"{DECODE_PATHS['static']} (CUDA graph capture failed: {str(exc).splitlines()[0][:200]})"
            self._step()
            return
        self.graph = graph
        self.path = DECODE_PATHS["cuda-graph"]
        graph.replay()

    def read(self) -> int:
        """The token the last launched step wrote: the one host sync per token."""
        return int(self.ids)


class MedPruner:
    """A stock transformers VLM with MedPruner pruning; load with `MedPruner.from_pretrained`."""

    def __init__(self, adapter: ModelAdapter, model_id: str) -> None:
        self.adapter = adapter
        self.model_id = model_id
        # The tiny random-weight demo checkpoint (medpruner.tiny marks it): its answers are meaningless,
        # and every report and the server's health say so.
        self.is_demo_model = Path(model_id, "MEDPRUNER_TINY.txt").is_file()
        # How `ask` decodes unless told otherwise (one of DECODE_MODES); "dynamic" is the reference path.
        self.decode = "auto"

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        *,
        renumber_positions: bool | None = None,
    ) -> "MedPruner":
        """Load a checkpoint (local path or hub id) with the stock Auto classes and pick its adapter.

        dtype None keeps the checkpoint's own dtype; device "auto" takes CUDA when available.
        renumber_positions: positions of the kept tokens after pruning, an adapter option. None takes
        the family's published behaviour (`adapter.renumber_positions_default`: original positions for
        Qwen-VL, renumbered 0..L'-1 for Gemma3/MedGemma); False keeps the original positions of the
        full sequence; True renumbers the kept tokens 0..L'-1.
        """
        if renumber_positions is not None and not isinstance(renumber_positions, bool):
            raise InputError(f"renumber_positions must be True, False or None, got {renumber_positions!r}.")
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        name = _local_checkpoint(os.fspath(path_or_id))
        torch_device = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype)
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as exc:
            where = "directory" if Path(name).exists() else "path or hub id"
            raise ModelLoadError(
                f"Cannot load a model config from {name!r} ({where}): {str(exc).splitlines()[0]}",
                "Give a local checkpoint directory (with config.json) or a hub id that is cached on this machine "
                "(HF_HUB_OFFLINE=1 makes a missing hub id fail at once instead of retrying the network).",
            ) from exc
        adapter_cls = adapter_for(getattr(config, "model_type", None))
        if adapter_cls is None:
            raise ModelLoadError(
                f"{name!r} is a {getattr(config, 'model_type', 'unknown')!r} model, which MedPruner does not support.",
                f"Supported model families: {', '.join(SUPPORTED_FAMILIES)}.",
            )
        try:
            model = adapter_cls.model_class().from_pretrained(name, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
            # The PIL backend: the torchvision one is not required, and gives different pixels.
            image_processor = AutoImageProcessor.from_pretrained(name, backend="pil")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"Cannot load the checkpoint {name!r}: {str(exc).splitlines()[0]}",
                "Check that the directory holds the model weights, tokenizer and preprocessor_config.json.",
            ) from exc
        if getattr(tokenizer, "chat_template", None) is None:
            raise ModelLoadError(
                f"The checkpoint {name!r} has no chat template.",
                "Add the instruct model's chat_template.jinja (or chat_template.json) to the checkpoint directory.",
            )
        model = model.to(torch_device).eval()
        return cls(adapter_cls(model, tokenizer, image_processor, renumber_positions=renumber_positions), name)

    @property
    def model(self):
        """The stock transformers model object."""
        return self.adapter.model

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    @property
    def image_processor(self):
        return self.adapter.image_processor

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- the two halves of a question -----------------------------------------------------------
    @torch.inference_mode()
    def prepare(
        self,
        slices: Any,
        config: PruningConfig | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        *,
        slice_mask: Any = None,
        token_budget: float | None = None,
        encode_dropped: bool = False,
        cache_prefix: bool = True,
    ) -> PreparedVolume:
        """Question-independent work: pixels, slice filter, vision encoder on kept slices, token selection,
        and (cache_prefix) the language model's KV cache of the pruned visual prefix of the prompt, so
        that every question about these slices only prefills its own tokens.

        Benchmark controls (leave them alone for normal use): `slice_mask` (bool (S,)) replaces the
        slice filter's decisions (the filter still runs, for its distances); `token_budget` in (0, 1]
        keeps each slice's top share of tokens instead of its nucleus (the merge still runs);
        `encode_dropped=True` encodes every slice and discards dropped ones afterwards, as the
        published reference code does.
        """
        config = config or PruningConfig()
        if not isinstance(config, PruningConfig):
            raise InputError(f"config must be a PruningConfig, got {type(config).__name__}.")
        images = _as_images(slices)
        clock = _Clock(self.device)
        notify = progress or (lambda stage, fraction: None)
        stop = cancel or (lambda: False)

        def checkpoint() -> None:
            if stop():
                raise Cancelled()

        notify("preprocess", 0.0)
        with clock.stage("preprocess"):
            pixels = self.adapter.preprocess(images)
        count = pixels.num_slices
        checkpoint()

        with clock.stage("pruning"):
            # gamma < 0 keeps every slice but still reports each slice's distance to its predecessor.
            gamma = config.gamma if config.prunes_slices else -1.0
            slice_kept, slice_l1 = slice_filter(pixels.stacked(), gamma)
        if slice_mask is not None:
            slice_kept = _checked_slice_mask(slice_mask, count)
        if token_budget is not None and not 0 < token_budget <= 1:
            raise InputError(f"token_budget must be in (0, 1], got {token_budget!r}.")
        kept_index = np.flatnonzero(slice_kept).tolist()
        checkpoint()

        notify("vision", 0.0)
        encoded_index = list(range(count)) if encode_dropped else kept_index
        with clock.stage("vision"):
            features = self.adapter.encode(self.adapter.subset(pixels, encoded_index))
        checkpoint()

        notify("prune", 0.0)
        token_h, token_w = pixels.token_grid
        with clock.stage("pruning"):
            embeds, scores, keys = features.embeds, features.scores, features.keys
            token_features = features.token_features
            if encode_dropped:   # reference style: every slice was encoded; keep the kept ones' rows
                rows = torch.as_tensor(kept_index, device=embeds.device)
                embeds, scores, keys = embeds[rows], scores[rows], keys[rows]
                token_features = {name: [layer[rows] for layer in layers] for name, layers in token_features.items()}
            selection = select_tokens(
                embeds, scores, keys,
                token_filter=config.prunes_tokens,
                tau=config.tau,
                temperature=config.temperature,
                contextual_ratio=config.contextual_ratio,
                merge=config.merge,
                budget=token_budget,
            )
            keep = selection.keep
            visual_embeds = selection.merged[keep]            # (n_kept, D): slice order, raster order
            visual_features = {name: [layer[keep] for layer in layers] for name, layers in token_features.items()}
            keep_rows = keep.cpu()
            visual_keep = torch.zeros(count, token_h * token_w, dtype=torch.bool)
            visual_keep[kept_index] = keep_rows
            probs = selection.probs.float().cpu().numpy().reshape(-1, token_h, token_w)
            roles = selection.roles.cpu().numpy().reshape(-1, token_h, token_w)
        token_scores: list[np.ndarray | None] = [None] * count
        token_role: list[np.ndarray | None] = [None] * count
        for row, slice_index in enumerate(kept_index):
            token_scores[slice_index] = probs[row]
            token_role[slice_index] = roles[row]
        checkpoint()
        prepared = PreparedVolume(
            pixels=pixels,
            config=config,
            slice_kept=slice_kept,
            slice_l1=slice_l1,
            token_scores=token_scores,
            token_role=token_role,
            visual_keep=visual_keep.reshape(-1),
            visual_embeds=visual_embeds,
            visual_features=visual_features,
            timings=clock.timings,
        )
        if cache_prefix:
            with clock.stage("prefix"):
                prepared.prefix = self._prefix_cache(prepared)
        return prepared

    @torch.inference_mode()
    def ask(
        self,
        slices: Any,
        question: str,
        config: PruningConfig | None = None,
        max_new_tokens: int = 128,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        ignore_eos: bool = False,
        on_text: TextFn | None = None,
        decode: str | None = None,
        **prepare_options: Any,
    ) -> AskResult:
        """Answer `question` about `slices`, or about a PreparedVolume (a follow-up), with greedy decoding.

        Given slices, it prepares them without keeping a prefix cache and prefills the whole pruned
        prompt in one pass. Given a PreparedVolume (a follow-up), it reuses the prepared prefix
        (pixels, decisions and the KV cache of the pruned visual prefix) and only prefills the question; its timings count only the work it did, and
        `result.prefix_reused` is True. `ignore_eos=True` always generates max_new_tokens tokens
        (fixed-length runs for benchmarks); `prepare_options` go to `prepare` (benchmark controls).
        `on_text(delta, text_so_far)` is called after each generated token (delta may be "" while a
        character is incomplete or trailing whitespace is held back); the deltas concatenate exactly to
        `result.answer` (see `TextStream`). `decode` (default `self.decode`, "auto") picks the decoder,
        one of DECODE_MODES: "auto" is "cuda-graph" on CUDA and "static" elsewhere; every mode gives
        the same greedy ids, and `result.decode_path` says which one ran.
        """
        start = time.perf_counter()
        question = _check_question(question)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        mode = self._decode_mode(decode)
        fresh = not isinstance(slices, PreparedVolume)
        if fresh:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            # A one-off question: one prefill pass over prefix and question (no cache kept for follow-ups).
            prepare_options.setdefault("cache_prefix", False)
            prepared = self.prepare(slices, config, progress, cancel, **prepare_options)
        else:
            prepared = slices   # peak memory then counts from the caller's last reset
        notify = progress or (lambda stage, fraction: None)
        stop = cancel or (lambda: False)
        clock = _Clock(self.device)

        notify("answer", 0.0)
        with clock.stage("prefill"):
            # A static cache holds the prompt and every answer token but the last (never fed back).
            room = None if mode == "dynamic" else max_new_tokens - 1
            logits, cache, next_position, full_length, kept_length = self._prefill_question(
                prepared, question, copy_prefix=not fresh, room=room
            )
        token_ids: list[int] = []
        eos = set() if ignore_eos else self.adapter.eos_token_ids()
        stream = TextStream(self.tokenizer, on_text) if on_text is not None else None
        with clock.stage("decode"):
            if mode == "dynamic":
                decoder: Any = _DynamicDecoder(self.adapter, cache, logits, next_position)
            else:
                decoder = _StaticDecoder(self.adapter, cache, logits, next_position, use_graph=mode == "cuda-graph")
            token = decoder.first()
            for step in range(max_new_tokens):
                token_ids.append(token)
                last = token in eos or step + 1 == max_new_tokens
                if not last:
                    decoder.launch(token)      # queued before this token's host work, which overlaps it
                if stream is not None:
                    stream.push(token, last)
                notify("answer", (step + 1) / max_new_tokens)
                if last:
                    break
                if stop():
                    raise Cancelled()
                token = decoder.read()
        if fresh:
            timings = {k: prepared.timings.get(k, 0.0) for k in ("preprocess", "vision", "pruning")}
            timings["prefill"] = prepared.timings.get("prefix", 0.0) + clock.timings["prefill"]
        else:
            timings = {"preprocess": 0.0, "vision": 0.0, "pruning": 0.0, "prefill": clock.timings["prefill"]}
        timings["decode"] = clock.timings["decode"]
        timings["total"] = time.perf_counter() - start
        tokens_total = int(prepared.visual_keep.numel())
        return AskResult(
            answer=self.tokenizer.decode(token_ids, skip_special_tokens=True).strip(),
            token_ids=token_ids,
            slice_kept=prepared.slice_kept,
            slice_l1=prepared.slice_l1,
            token_grid=[prepared.pixels.token_grid] * prepared.num_slices,
            token_scores=prepared.token_scores,
            token_role=prepared.token_role,
            counts={
                "visual_tokens_total": tokens_total,
                "visual_tokens_kept": int(prepared.visual_keep.sum()),
                "prompt_tokens_full": full_length,
                "prompt_tokens_pruned": kept_length,
                "slices_total": prepared.num_slices,
                "slices_kept": int(prepared.slice_kept.sum()),
                "generated_tokens": len(token_ids),
            },
            timings=timings,
            peak_memory_bytes=int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None,
            image_size=prepared.pixels.image_size,
            model_id=self.model_id,
            config=prepared.config.to_dict(),
            prefix_reused=not fresh and prepared.prefix is not None,
            decode_path=decoder.path,
        )

    def _decode_mode(self, decode: str | None) -> str:
        """The decoder `ask` runs: "auto" resolved for this device."""
        mode = self.decode if decode is None else decode
        if mode not in DECODE_MODES:
            raise InputError(f"decode must be one of {', '.join(DECODE_MODES)}; got {mode!r}.")
        if mode == "auto":
            return "cuda-graph" if self.device.type == "cuda" else "static"
        return mode

    @torch.inference_mode()
    def prefill_logits(self, slices: Any, question: str, config: PruningConfig | None = None) -> torch.Tensor:
        """Logits (L', V) at every position of the (pruned) prompt: for exactness checks and research."""
        prepared = slices if isinstance(slices, PreparedVolume) else self.prepare(slices, config)
        return self._prefill(prepared, _check_question(question), all_logits=True)[0]

    def _prefill(self, prepared: PreparedVolume, question: str, all_logits: bool = False, room: int | None = None):
        """Full prompt -> keep mask -> stock language model on kept tokens at their original positions, in one pass.

        room None: into a new stock dynamic cache; else into a static cache with `room` free slots.
        """
        input_ids, positions, next_position, _, keep = self._full_prompt(prepared, question)
        kept_length = int(keep.sum())
        cache = None if room is None else self.adapter.static_cache(kept_length + room)
        logits, cache = self.adapter.prefill(
            input_ids[:, keep], prepared.visual_embeds, prepared.visual_features, positions[:, keep], all_logits,
            cache=cache,
        )
        return logits, cache, next_position, int(input_ids.shape[1]), kept_length

    def _full_prompt(self, prepared: PreparedVolume, question: str):
        """Full prompt ids, positions, next position, and the keep mask over the sequence.

        Positions are the full sequence's original ones, or, when the adapter renumbers, each kept
        token's rank among the kept tokens (0..L'-1, every position row alike; dropped tokens get their
        neighbour's value and are filtered out anyway), so the prefix cache and follow-ups agree.
        """
        adapter = self.adapter
        input_ids = adapter.prompt_ids(prepared.num_slices, prepared.tokens_per_slice, question)
        positions, next_position = adapter.positions(input_ids, prepared.num_slices, prepared.pixels)
        visual = adapter.image_token_mask(input_ids)
        keep = torch.ones_like(visual)
        keep[visual] = prepared.visual_keep
        if adapter.renumber_positions:
            rank = torch.cumsum(keep.to(torch.long), dim=0) - 1
            positions = rank.to(positions.device, positions.dtype).expand_as(positions).clone()
            next_position = int(keep.sum())
        return input_ids, positions, next_position, visual, keep

    def _prefix_cache(self, prepared: PreparedVolume) -> PrefixCache:
        """Prefill the kept tokens of the prompt up to its last visual token; keep the cache."""
        input_ids, positions, next_position, visual, keep = self._full_prompt(prepared, _PREFIX_PROBE_QUESTION)
        length = int(torch.nonzero(visual).max()) + 1
        kept = keep[:length]
        _, cache = self.adapter.prefill(
            input_ids[:, :length][:, kept], prepared.visual_embeds, prepared.visual_features,
            positions[:, :length][:, kept],
        )
        # Text after the visual prefix continues from one past its largest position (pruned tokens
        # included), in every row, for every family here; checked on this prompt, so a follow-up
        # can skip recomputing the positions of the whole prompt (M-RoPE: ~10 ms of host time at 64 slices).
        start = int(positions[:, :length].max()) + 1
        tail = input_ids.shape[1] - length
        expected = start + torch.arange(tail, dtype=positions.dtype).expand(positions.shape[0], tail)
        follows = torch.equal(positions[:, length:], expected) and next_position == start + tail
        return PrefixCache(ids=input_ids[:, :length], cache=cache, kept_length=int(kept.sum()),
                           text_position=start if follows else None)

    def _prefill_question(self, prepared: PreparedVolume, question: str, copy_prefix: bool, room: int | None = None):
        """Prefill only the question's tokens on top of the cached prefix (a copy of it for follow-ups).

        room None: on the stock dynamic cache (copied when copy_prefix); else on a static cache with
        `room` free slots after the question, filled from the prefix (always a copy).
        """
        prefix = prepared.prefix
        if prefix is None:
            return self._prefill(prepared, question, room=room)
        length = prefix.ids.shape[1]
        if prefix.text_position is None:
            input_ids, positions, next_position, _, _ = self._full_prompt(prepared, question)
        else:   # only the question's positions, which follow the prefix's (see _prefix_cache)
            input_ids = self.adapter.prompt_ids(prepared.num_slices, prepared.tokens_per_slice, question)
            tail = input_ids.shape[1] - length
            # (the prefix's own positions are never read again: its cache holds them)
            positions = torch.full((self.adapter.position_rows, input_ids.shape[1]), -1, dtype=torch.long)
            positions[:, length:] = prefix.text_position + torch.arange(tail)
            next_position = prefix.text_position + tail
        if not torch.equal(input_ids[:, :length], prefix.ids):   # a template whose prefix depends on the question
            return self._prefill(prepared, question, room=room)
        kept_length = prefix.kept_length + input_ids.shape[1] - length
        if room is None:
            cache = copy.deepcopy(prefix.cache) if copy_prefix else prefix.cache
        else:
            cache = self.adapter.static_cache(kept_length + room)
            self.adapter.fill_cache(cache, prefix.cache, prefix.kept_length)
        logits = self.adapter.extend(input_ids[:, length:], positions[:, length:], cache)
        return logits, cache, next_position, int(input_ids.shape[1]), kept_length
