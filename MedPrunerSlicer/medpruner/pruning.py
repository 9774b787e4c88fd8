"""MedPruner's two selection stages and the contextual merge, in plain torch.

Stage 1 (slice level) visits slices in order against a moving anchor; stage 2 (token level) keeps
each slice's information nucleus and folds every other token into a few contextual tokens. The
functions are model-agnostic: adapters give them pixels, attention scores, keys and embeddings.
Stage 2 works on all kept slices at once, (K, n) with n tokens per slice, on the model's device:
no Python loop over slices or tokens and no host synchronisation per slice, so selection costs a
few kernel launches whatever the number of slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ROLE_PRUNED = 0       # not seen by the LLM itself: merged into its most similar contextual token
ROLE_CONTEXTUAL = 1   # kept, carrying the merged background
ROLE_NUCLEUS = 2      # kept by the information nucleus

_FILTER_CHUNK = 8     # slices compared to the anchor per step of the slice filter


def slice_filter(pixels: torch.Tensor, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Anchor-based inter-slice filter on the model's normalised pixels.

    pixels: (S, ...) one row per slice. Slice 0 is kept and is the first anchor; slice i is kept,
    and becomes the anchor, iff mean(|x_i - x_anchor|) > gamma (strict). Returns (kept bool (S,),
    l1 float32 (S,) with NaN for slice 0). The next slices are compared to the anchor a chunk at a
    time, one host round-trip per chunk; distances past a new anchor are recomputed against it.
    """
    flat = pixels.reshape(pixels.shape[0], -1)
    count = flat.shape[0]
    kept = np.zeros(count, dtype=bool)
    l1 = np.full(count, np.nan, dtype=np.float32)
    if count == 0:
        return kept, l1
    kept[0] = True
    anchor, start = 0, 1
    while start < count:
        block = flat[start:start + _FILTER_CHUNK]
        distance = (block.float() - flat[anchor].float()).abs().mean(dim=1).cpu().numpy()
        over = np.flatnonzero(distance > gamma)
        stop = len(distance) if over.size == 0 else int(over[0]) + 1
        l1[start:start + stop] = distance[:stop]
        if over.size:
            anchor = start + stop - 1
            kept[anchor] = True
        start += stop
    return kept, l1


def _probability_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the nucleus boundary exact to rounding; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def nucleus(scores: torch.Tensor, tau: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Information nucleus of each slice (rows of `scores`, shape (K, n) or (n,)).

    p = softmax(scores / temperature); tokens sorted by p (descending, stable); the shortest prefix
    whose cumulative mass reaches tau is selected. Every softmax probability is > 0, so tau = 1 keeps
    every token (rounding must not stop it early). Returns (p, selected bool), shaped like `scores`.
    """
    probs = torch.softmax(scores.to(_probability_dtype(scores.device)) / temperature, dim=-1)
    if tau >= 1.0:
        return probs, torch.ones_like(probs, dtype=torch.bool)
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    mass = torch.cumsum(torch.gather(probs, -1, order), dim=-1)
    # mass is non-decreasing, so the first prefix reaching tau has (entries below tau) + 1 tokens.
    count = ((mass < tau).sum(dim=-1, keepdim=True) + 1).clamp(max=probs.shape[-1])
    ranks = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ranks < count)
    return probs, selected


def top_fraction(scores: torch.Tensor, fraction: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ceil(fraction * n) most probable tokens of each row instead of the nucleus (benchmark operating points)."""
    probs = torch.softmax(scores.to(_probability_dtype(scores.device)) / temperature, dim=-1)
    n = probs.shape[-1]
    count = min(max(math.ceil(fraction * n), 1), n)
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    ranks = torch.arange(n, device=probs.device).expand_as(probs)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ranks < count)
    return probs, selected


def contextual_merge(
    embeds: torch.Tensor,
    keys: torch.Tensor,
    selected: torch.Tensor,
    contextual_ratio: float,
    merge: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep contextual tokens among the non-nucleus ones and merge every other token into one of them.

    Shapes: embeds (K, n, D), keys (K, n, d), selected (K, n); or the same without K.
    n_ctx = max(int(ratio * n), 1). Among a slice's non-nucleus tokens in raster order, the targets
    are those at 0, step, 2*step, ... (step = max(1, n_nonselected // n_ctx)), the first n_ctx. Each
    other non-nucleus token goes to the target with the highest key cosine similarity (the first
    such target on ties). merge="reference": target + mean(assigned) (the published code);
    "mean": mean of the target and its assigned tokens.
    Returns (roles uint8 (K, n), merged embeddings (K, n, D)): targets hold their merged value, every
    other row is unchanged; the LLM gets the rows whose role is not ROLE_PRUNED, in raster order.
    """
    if embeds.dim() == 2:
        roles, merged = contextual_merge(embeds[None], keys[None], selected[None], contextual_ratio, merge)
        return roles[0], merged[0]
    n = embeds.shape[1]
    rest = ~selected
    n_ctx = max(int(contextual_ratio * n), 1)
    step = (rest.sum(dim=1, keepdim=True) // n_ctx).clamp(min=1)
    rank = torch.cumsum(rest, dim=1) - 1                      # rank among the slice's non-nucleus tokens
    is_target = rest & (rank % step == 0) & (rank // step < n_ctx)
    absorbed = rest & ~is_target
    roles = torch.where(selected, ROLE_NUCLEUS, torch.where(is_target, ROLE_CONTEXTUAL, ROLE_PRUNED)).to(torch.uint8)

    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    similarity = (unit @ unit.transpose(1, 2)).masked_fill(~is_target[:, None, :], float("-inf"))
    choice = similarity.argmax(dim=-1)                        # (K, n): target index of every token
    weight = absorbed.float()
    sums = torch.zeros(embeds.shape, dtype=torch.float32, device=embeds.device)
    sums.scatter_add_(1, choice[..., None].expand(-1, -1, embeds.shape[2]), embeds.float() * weight[..., None])
    counts = torch.zeros(weight.shape, dtype=torch.float32, device=embeds.device).scatter_add_(1, choice, weight)
    counts = counts[..., None]
    base = embeds.float()
    if merge == "reference":
        new = torch.where(counts > 0, base + sums / counts.clamp(min=1), base)
    else:
        new = (base + sums) / (counts + 1)
    merged = torch.where(is_target[..., None], new.to(embeds.dtype), embeds)
    return roles, merged


@dataclass
class TokenSelection:
    """Decisions and LLM-ready embeddings of K encoded slices of n tokens each."""

    roles: torch.Tensor    # uint8 (K, n): ROLE_NUCLEUS / ROLE_CONTEXTUAL / ROLE_PRUNED, raster order
    probs: torch.Tensor    # (K, n): nucleus probability of each token
    merged: torch.Tensor   # (K, n, D): embeddings with the merge applied to contextual tokens

    @property
    def keep(self) -> torch.Tensor:
        return self.roles > ROLE_PRUNED


def select_tokens(
    embeds: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    *,
    token_filter: bool,
    tau: float,
    temperature: float,
    contextual_ratio: float,
    merge: str,
    budget: float | None = None,
) -> TokenSelection:
    """Stage 2 for K slices at once: nucleus probabilities always (for the heatmap), selection if enabled.

    `budget` replaces the nucleus by the top `budget` share of tokens (benchmark operating points).
    """
    if not token_filter:
        probs = torch.softmax(scores.to(_probability_dtype(scores.device)) / temperature, dim=-1)
        roles = torch.full(scores.shape, ROLE_NUCLEUS, dtype=torch.uint8, device=scores.device)
        return TokenSelection(roles=roles, probs=probs, merged=embeds)
    if budget is None:
        probs, selected = nucleus(scores, tau, temperature)
    else:
        probs, selected = top_fraction(scores, budget, temperature)
    roles, merged = contextual_merge(embeds, keys, selected, contextual_ratio, merge)
    return TokenSelection(roles=roles, probs=probs, merged=merged)
