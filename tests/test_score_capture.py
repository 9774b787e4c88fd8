"""Score capture without the N x N attention matrix: the same numbers and the same kept tokens as the
float32 matrix it replaces, for every family, and memory that grows with block x N, never N x N."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from medpruner import MedPruner, PruningConfig
from medpruner.adapters import gemma3, qwen2_5_vl, qwen3_vl, scores
from medpruner.adapters.scores import received_attention
from medpruner.pruning import select_tokens
from medpruner.tiny import TINY_FAMILIES, build_tiny_checkpoint
from test_adapters_common import make_slices

RTOL = 1e-5        # adapters: relative, against the float32 matrix (the tiny models' logits are small)


def matrix_received(q: torch.Tensor, k: torch.Tensor, scaling: float, dtype: torch.dtype = torch.float64
                    ) -> torch.Tensor:
    """Test-only reference: each group's whole attention matrix, softmax, mean over heads, sum over queries
    (with dtype=float32, exactly what the adapters computed before)."""
    logits = q.to(dtype) @ k.to(dtype).transpose(-1, -2)
    return torch.softmax(logits * scaling, dim=-1).mean(dim=1).sum(dim=1).float()


def rtol(q: torch.Tensor, k: torch.Tensor, scaling: float) -> float:
    """The documented tolerance (scores.py): relative 2**-20 x max(1, largest |scaled logit|)."""
    return scores.relative_tolerance(float((q.double() @ k.double().transpose(-1, -2) * scaling).abs().max()))


def random_qk(batch: int, heads: int, length: int, dim: int, spread: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, length, dim, generator=gen) * spread,
            torch.randn(batch, heads, length, dim, generator=gen) * spread)


# -- the two methods against the matrix ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["fused", "blocks"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (3, 2, 37, 8), (2, 4, 130, 5), (1, 3, 300, 72)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_method_equals_the_matrix(method, shape, dtype):
    q, k = random_qk(*shape, spread=2.0)
    q, k = q.to(dtype), k.to(dtype)
    scaling = shape[-1] ** -0.5
    ours = received_attention(q, k, scaling, method=method)
    assert ours.dtype == torch.float32 and ours.shape == shape[:1] + shape[2:3]
    tolerance = rtol(q, k, scaling)
    torch.testing.assert_close(ours, matrix_received(q, k, scaling), rtol=tolerance, atol=1e-7)
    # Every query's softmax row sums to 1: each group's scores add up to its number of queries.
    torch.testing.assert_close(ours.sum(dim=1), torch.full((shape[0],), float(shape[2])), rtol=tolerance, atol=0)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), length=st.integers(1, 200), dim=st.integers(1, 20),
       spread=st.floats(0.01, 6.0), seed=st.integers(0, 2**31 - 1), budget=st.integers(1, 2**20))
def test_fused_and_blocks_agree_on_any_shape_and_block(batch, heads, length, dim, spread, seed, budget):
    q, k = random_qk(batch, heads, length, dim, spread, seed)
    reference, tolerance = matrix_received(q, k, 0.7), rtol(q, k, 0.7)
    torch.testing.assert_close(received_attention(q, k, 0.7, method="fused"), reference, rtol=tolerance, atol=1e-7)
    torch.testing.assert_close(received_attention(q, k, 0.7, budget_bytes=budget, method="blocks"), reference,
                               rtol=tolerance, atol=1e-7)


def test_method_is_validated():
    q, k = random_qk(1, 1, 4, 8, 1.0)
    with pytest.raises(ValueError, match="method"):
        received_attention(q, k, 0.5, method="flash")
    meta = torch.empty(1, 1, 4, 8, device="meta")
    with pytest.raises(ValueError, match="No fused attention kernel"):
        received_attention(meta, meta, 0.5, method="fused")


def test_a_fused_kernel_that_disagrees_or_fails_is_not_used(monkeypatch, caplog):
    q, k = random_qk(2, 2, 50, 8, 2.0)
    expected = matrix_received(q, k, 0.4)

    def wrong(q, k, scale):
        return scores._lse_cpu(q, k, scale) * 0.9

    def failing(q, k, scale):
        raise RuntimeError("no kernel for these shapes")

    monkeypatch.setattr(scores, "AUTO_FUSED_DEVICES", ("cpu", "cuda"))   # as on a GPU: auto tries the kernel
    for kernel in (wrong, failing):
        monkeypatch.setattr(scores, "_fused_verdicts", {})
        monkeypatch.setattr(scores, "_lse_kernel", lambda device, dtype, kernel=kernel: (kernel, torch.float32))
        with caplog.at_level(logging.WARNING, logger="medpruner"):
            ours = received_attention(q, k, 0.4)
        torch.testing.assert_close(ours, expected, rtol=rtol(q, k, 0.4), atol=1e-7)
        assert "using query blocks" in caplog.text
        caplog.clear()


# -- memory ---------------------------------------------------------------------------------------------
class _Shapes(TorchDispatchMode):
    """Records the number of elements of every tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def _largest_allocation(fn) -> int:
    """Bytes of the largest allocation any operator makes while fn runs, kernel-internal buffers included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


@pytest.mark.parametrize("method", ["fused", "blocks"])
def test_one_slice_never_allocates_an_n_by_n_matrix(method):
    """One slice of N = 4096 tokens, 2 heads: the largest tensor an operator returns, and the largest
    allocation any operator makes inside, stay far below one N x N float32 matrix (64 MiB)."""
    length, heads = 4096, 2
    q, k = random_qk(1, heads, length, 16, 1.0)
    block_rows = 64
    budget = block_rows * heads * length * 4          # the blocks path then takes 64 query rows at a time
    matrix_bytes = length * length * 4

    def capture():
        return received_attention(q, k, 0.25, budget_bytes=budget, method=method)

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 4))           # the CPU kernel's tile buffers are per thread
    try:
        with _Shapes() as shapes:
            capture()
        largest = _largest_allocation(capture)
        # The probe sees the allocation of a matrix when there is one.
        assert _largest_allocation(lambda: matrix_received(q, k, 0.25, torch.float32)) >= matrix_bytes
    finally:
        torch.set_num_threads(threads)
    assert shapes.largest <= heads * block_rows * length < length * length
    assert largest <= max(heads * block_rows * length * 4, 8 * 2**20) < matrix_bytes // 4


# -- every family's adapter: the same scores and kept tokens as the float32 matrix -------------------------
ADAPTER_MODULES = {"qwen3_vl": qwen3_vl, "qwen2_5_vl": qwen2_5_vl, "gemma3": gemma3}
SIZES = {"qwen3_vl": 224, "qwen2_5_vl": 168, "gemma3": 128}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: build_tiny_checkpoint(root / f"tiny-{name}", family=name) for name in TINY_FAMILIES}


@pytest.fixture(scope="module", params=[(name, dtype) for name in TINY_FAMILIES for dtype in ("float32", "bfloat16")],
                ids=lambda param: "-".join(param))
def family(request, checkpoints):
    name, dtype = request.param
    return name, MedPruner.from_pretrained(checkpoints[name], device="cpu", dtype=dtype)


def _last_block_kinds(name: str) -> list[str]:
    """Qwen2.5-VL's last block is windowed in the tiny model and full in the real one: both are checked."""
    return ["window", "full"] if name == "qwen2_5_vl" else ["only"]


def _set_last_block(engine, kind: str) -> list[int]:
    visual = engine.model.model.visual
    saved = list(visual.fullatt_block_indexes)
    last = len(visual.blocks) - 1
    visual.fullatt_block_indexes = [i for i in saved if i != last] + ([last] if kind == "full" else [])
    return saved


def test_adapters_capture_the_matrix_scores_and_keep_the_same_tokens(family, monkeypatch):
    name, engine = family
    adapter, module = engine.adapter, ADAPTER_MODULES[name]
    slices = make_slices(SIZES[name])
    pixels = adapter.preprocess(list(slices))
    for kind in _last_block_kinds(name):
        saved = _set_last_block(engine, kind) if kind != "only" else None
        try:
            with torch.inference_mode():
                ours = adapter.encode(pixels)
                calls = []

                def float32_matrix(q, k, scaling, **kwargs):
                    calls.append(q.shape)
                    return matrix_received(q, k, scaling, torch.float32)

                with monkeypatch.context() as patch:
                    patch.setattr(module, "received_attention", float32_matrix)
                    before = adapter.encode(pixels)
                    assert calls, "the reference must replace the adapter's capture"
                    prepared_before = engine.prepare(slices, PruningConfig(tau=0.6), cache_prefix=False)
                prepared = engine.prepare(slices, PruningConfig(tau=0.6), cache_prefix=False)
        finally:
            if saved is not None:
                engine.model.model.visual.fullatt_block_indexes = saved
        torch.testing.assert_close(ours.scores, before.scores, rtol=RTOL, atol=0)
        assert torch.equal(ours.keys, before.keys) and torch.equal(ours.embeds, before.embeds)
        assert float(ours.scores.std()) > 1e-3 * float(ours.scores.mean()), "flat scores would decide nothing"
        for tau in (0.3, 0.6, 0.9):
            kept = [select_tokens(f.embeds, f.scores, f.keys, token_filter=True, tau=tau, temperature=2.0,
                                  contextual_ratio=0.05, merge="reference").roles for f in (ours, before)]
            assert torch.equal(kept[0], kept[1]), (name, kind, tau)
        for role, role_before in zip(prepared.token_role, prepared_before.token_role, strict=True):
            assert (role is None) == (role_before is None)
            if role is not None:
                np.testing.assert_array_equal(role, role_before)
