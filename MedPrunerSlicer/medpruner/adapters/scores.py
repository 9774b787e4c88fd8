"""Token importance in the last vision block without the N x N attention matrix.

The score of key j is the attention it receives: softmax over keys of s_ij = scale * q_i . k_j,
mean over heads, summed over queries (column sums). Recomputing that matrix in float32 cost 10-40 %
of the time to first token on a GPU (README benchmarks), so it is computed one of two ways, with the
same numbers:

- "fused": two passes of PyTorch's fused flash-attention kernel, which returns the log-sum-exp of
  every query row in float32 and never stores the scores (it works on tiles in fast memory).
  Pass 1 gives lse_i = log sum_j exp(s_ij). Pass 2 swaps queries and keys and folds -lse_i into the
  dot product through extra dimensions (keys get the constant 1, queries get -lse_i / scale), so its
  log-sum-exp for row j is log sum_i exp(s_ij - lse_i) = log(column sum j): the score itself.
  Cost: about twice the attention of the block itself (one of the encoder's 24-32 blocks), extra
  memory O(N d). In half precision -lse_i / scale is split into three half-precision pieces whose
  sum is float32-exact; the kernel accumulates dot products in float32.
- "blocks": query blocks of full rows in float32, one softmax per row, column sums accumulated;
  extra memory O(block x N) (`budget_bytes`). Every device and dtype; the fallback, and the
  reference the fused path is checked against.

Tolerance (`relative_tolerance`, tests/test_score_capture.py): against a float64 reference, both
ways are within relative 2**-20 x max(1, L), L the largest |scaled logit| of the group, i.e. 1e-5
up to L = 10 (measured on CPU: fused <= 9 x 2**-24 x L, blocks and the float32 matrix it replaces
<= 6 x 2**-24 x L: float32 logits carry that error whatever the method). On CPU the fused kernel
runs in float32 also for bfloat16 inputs (an exact upcast), since PyTorch's bfloat16 CPU kernel
keeps row sums to only ~6e-5 relative; so bfloat16 models get the same tolerance there. On CUDA in
bfloat16/float16 (the flash kernel) nothing could be measured here (no GPU): before its first use
on a (device, dtype, head size) the fused path is compared with the blocks path on a small problem
and used only within relative 1e-4 (FUSED_CHECK_RTOL; expected ~1e-6, as half-precision products
are exact in the kernel's float32 accumulation), else the blocks path is used and a warning logged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("medpruner")

SCORE_BLOCK_BYTES = 64 * 2**20     # float32 scores of one query block in the "blocks" path
FUSED_CHECK_RTOL = 1e-4            # the fused kernel must match the blocks path this closely once
AUTO_FUSED_DEVICES = ("cuda",)     # where method="auto" tries the fused path (on CPU blocks are faster)
_HALF = (torch.float16, torch.bfloat16)
_fused_verdicts: dict[tuple[str, int | None, torch.dtype, int], bool] = {}

LseKernel = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def relative_tolerance(largest_logit: float) -> float:
    """Documented relative error of either method for a group whose largest |scaled logit| is given."""
    return 2.0**-20 * max(1.0, largest_logit)


def _lse_cpu(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, M) float32 log-sum-exp of each query row, by PyTorch's CPU flash-attention kernel."""
    k = k.contiguous()   # also the (ignored) values: the kernel wants one head size for q, k and v
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=scale)[1]


def _lse_cuda(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, M) float32 log-sum-exp of each query row, by PyTorch's CUDA flash-attention kernel."""
    k = k.contiguous()
    return torch.ops.aten._scaled_dot_product_flash_attention(q.contiguous(), k, k, 0.0, False, False,
                                                              scale=scale)[1]


def _lse_kernel(device: torch.device, dtype: torch.dtype) -> tuple[LseKernel, torch.dtype] | None:
    """The fused kernel for this device and input dtype, and the dtype to run it in (None: no kernel)."""
    if device.type == "cpu":
        return _lse_cpu, torch.float32
    if device.type == "cuda" and dtype in _HALF:
        return _lse_cuda, dtype
    return None


def _pad_to_8(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the head size to a multiple of 8 (flash kernels' alignment; zeros add nothing to q . k)."""
    return torch.nn.functional.pad(x, (0, -x.shape[-1] % 8))


def _received_fused(q: torch.Tensor, k: torch.Tensor, scaling: float, kernel: LseKernel, dtype: torch.dtype
                    ) -> torch.Tensor:
    """Two log-sum-exp passes of the fused kernel, run in `dtype` (see the module docstring)."""
    q, k = q.to(dtype), k.to(dtype)
    lse = kernel(_pad_to_8(q), _pad_to_8(k), scaling)                        # (B, H, N) float32
    bias = -lse / scaling
    pieces = []
    for _ in range(1 if dtype == torch.float32 else 3):   # sum of the pieces = bias to float32 rounding
        piece = bias.to(dtype)
        pieces.append(piece)
        bias = bias - piece.float()
    extra_q = torch.stack(pieces, dim=-1)
    extra_k = torch.ones_like(extra_q)
    # Reverse pass: rows are keys j, columns queries i, dot product k_j . q_i - lse_i / scale.
    column_lse = kernel(_pad_to_8(torch.cat([k, extra_k], dim=-1)), _pad_to_8(torch.cat([q, extra_q], dim=-1)),
                        scaling)
    return column_lse.exp().mean(dim=1)


def _received_blocks(q: torch.Tensor, k: torch.Tensor, scaling: float, budget_bytes: int) -> torch.Tensor:
    """Full score rows a block at a time: each row's softmax needs all its keys, never all the queries."""
    batch, heads, length, _ = q.shape
    rows = max(1, budget_bytes // (heads * length * 4))     # float32 score rows (all heads) per block
    groups = max(1, min(batch, rows // length))            # whole groups at a time when they fit
    queries = min(length, rows)
    keys_t = k.float().transpose(-1, -2)
    out = torch.zeros(batch, length, dtype=torch.float32, device=q.device)
    for first in range(0, batch, groups):
        kb = keys_t[first:first + groups]
        for start in range(0, length, queries):
            logits = q[first:first + groups, :, start:start + queries].float() @ kb
            out[first:first + groups] += torch.softmax(logits.mul_(scaling), dim=-1).sum(dim=(1, 2))
    return out / heads


def _fused_is_verified(found: tuple[LseKernel, torch.dtype], dtype: torch.dtype, device: torch.device,
                       head_size: int) -> bool:
    """Whether the fused path matches the blocks path here; decided once per (device, dtype, head size).

    A kernel that is missing, refuses these shapes or gives other numbers is not used.
    """
    key = (device.type, device.index, dtype, head_size)
    if key not in _fused_verdicts:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k = (torch.randn(2, 2, 67, head_size, generator=gen) * 2).to(device, dtype).unbind(0)
        q, k = q[None], k[None]
        scaling = head_size**-0.5
        try:
            fused = _received_fused(q, k, scaling, *found)
            blocks = _received_blocks(q, k, scaling, SCORE_BLOCK_BYTES)
            ok = bool(torch.allclose(fused, blocks, rtol=FUSED_CHECK_RTOL, atol=0))
            reason = "" if ok else f"max relative difference {float(((fused - blocks) / blocks).abs().max()):.1e}"
        except (RuntimeError, NotImplementedError, AttributeError) as error:
            ok, reason = False, f"{type(error).__name__}: {error}"
        if not ok:
            log.warning("fused score capture unavailable on %s/%s (head size %d), using query blocks: %s",
                        device, dtype, head_size, reason)
        _fused_verdicts[key] = ok
    return _fused_verdicts[key]


@torch.no_grad()
def received_attention(
    q: torch.Tensor, k: torch.Tensor, scaling: float, budget_bytes: int = SCORE_BLOCK_BYTES, method: str = "auto"
) -> torch.Tensor:
    """Attention each key receives: softmax(q kᵀ * scaling) over keys, mean over heads, summed over queries.

    q, k: (B, heads, N, d) in the model's dtype, B independent attention groups (slices, or windows
    of one length). Returns (B, N) float32. method: "fused", "blocks", or "auto" (fused on an accelerator
    whose kernel exists and has been verified there, else blocks); see the module docstring.
    """
    if method not in ("auto", "fused", "blocks"):
        raise ValueError(f"method must be 'auto', 'fused' or 'blocks', got {method!r}.")
    # "auto" takes the fused path on accelerators only: on CPU the blocks path is the faster one
    # (measured: N = 4096, 16 heads, 2 cores: blocks 2.2 s, fused 2.9 s); "fused" forces it anywhere.
    auto_blocks = method == "auto" and q.device.type not in AUTO_FUSED_DEVICES
    found = None if method == "blocks" or auto_blocks else _lse_kernel(q.device, q.dtype)
    if method == "fused" and found is None:
        raise ValueError(f"No fused attention kernel for {q.dtype} on {q.device.type}.")
    if found is not None and (method == "fused" or _fused_is_verified(found, q.dtype, q.device, q.shape[-1])):
        return _received_fused(q, k, scaling, *found)
    return _received_blocks(q, k, scaling, budget_bytes)
