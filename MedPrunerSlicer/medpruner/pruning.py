"""MedPruner's two selection stages and the contextual merge, in plain torch.

Stage 1 (slice level) visits slices in order against a moving anchor; stage 2 (token level) keeps
each slice's information nucleus and folds every other token into a few contextual tokens. The
functions are model-agnostic: adapters give them pixels, attention scores, keys and embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ROLE_PRUNED = 0       # not seen by the LLM itself: merged into its most similar contextual token
ROLE_CONTEXTUAL = 1   # kept, carrying the merged background
ROLE_NUCLEUS = 2      # kept by the information nucleus


def slice_filter(pixels: torch.Tensor, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Anchor-based inter-slice filter on the model's normalised pixels.

    pixels: (S, ...) one row per slice. Slice 0 is kept and is the first anchor; slice i is kept,
    and becomes the anchor, iff mean(|x_i - x_anchor|) > gamma (strict). Returns (kept bool (S,),
    l1 float32 (S,) with NaN for slice 0). The loop is over slices; each step is one vectorised op.
    """
    flat = pixels.reshape(pixels.shape[0], -1)
    count = flat.shape[0]
    kept = np.zeros(count, dtype=bool)
    l1 = np.full(count, np.nan, dtype=np.float32)
    if count == 0:
        return kept, l1
    kept[0] = True
    anchor = flat[0]
    for i in range(1, count):
        distance = float((flat[i].float() - anchor.float()).abs().mean())
        l1[i] = distance
        if distance > gamma:
            kept[i] = True
            anchor = flat[i]
    return kept, l1


def nucleus(scores: torch.Tensor, tau: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Information nucleus of one slice.

    p = softmax(scores / temperature); tokens sorted by p (descending, stable); the shortest prefix
    whose cumulative mass reaches tau is selected. Every softmax probability is > 0, so tau = 1 keeps
    every token (rounding must not stop it early). Returns (p float64 (n,), selected bool (n,)).
    """
    probs = torch.softmax(scores.to(torch.float64) / temperature, dim=-1)
    if tau >= 1.0:
        return probs, torch.ones_like(probs, dtype=torch.bool)
    order = torch.argsort(probs, descending=True, stable=True)
    mass = torch.cumsum(probs[order], dim=0)
    target = torch.tensor([tau], dtype=mass.dtype, device=mass.device)
    count = min(int(torch.searchsorted(mass, target, side="left")) + 1, probs.numel())
    selected = torch.zeros_like(probs, dtype=torch.bool)
    selected[order[:count]] = True
    return probs, selected


def top_fraction(scores: torch.Tensor, fraction: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ceil(fraction * n) most probable tokens instead of the nucleus: a fixed operating point for benchmarks."""
    probs = torch.softmax(scores.to(torch.float64) / temperature, dim=-1)
    count = min(max(math.ceil(fraction * probs.numel()), 1), probs.numel())
    order = torch.argsort(probs, descending=True, stable=True)
    selected = torch.zeros_like(probs, dtype=torch.bool)
    selected[order[:count]] = True
    return probs, selected


@dataclass
class SliceSelection:
    """Decisions and LLM-ready embeddings of one encoded slice."""

    roles: torch.Tensor          # uint8 (n,): ROLE_NUCLEUS / ROLE_CONTEXTUAL / ROLE_PRUNED, raster order
    probs: torch.Tensor          # float64 (n,): nucleus probability of each token
    kept_embeds: torch.Tensor    # (n_kept, D): embeddings of the kept tokens in raster order, merged


def contextual_merge(
    embeds: torch.Tensor,
    keys: torch.Tensor,
    selected: torch.Tensor,
    contextual_ratio: float,
    merge: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep contextual tokens among the non-nucleus ones and merge every other token into one of them.

    n_ctx = max(int(ratio * n), 1). Among the non-nucleus tokens in raster order, the targets are
    those at 0, step, 2*step, ... (step = max(1, n_nonselected // n_ctx)), the first n_ctx. Each
    other non-nucleus token goes to the target with the highest key cosine similarity.
    merge="reference": target + mean(assigned) (the published code); "mean": mean of target and assigned.
    Returns (roles uint8 (n,), kept embeddings (n_kept, D) in raster order).
    """
    n = embeds.shape[0]
    roles = torch.where(selected, ROLE_NUCLEUS, ROLE_PRUNED).to(torch.uint8)
    rest = torch.nonzero(~selected, as_tuple=False).flatten()
    if rest.numel() == 0:
        return roles, embeds
    n_ctx = max(int(contextual_ratio * n), 1)
    step = max(1, rest.numel() // n_ctx)
    targets = rest[::step][:n_ctx]
    is_target = torch.zeros(n, dtype=torch.bool, device=embeds.device)
    is_target[targets] = True
    roles[targets] = ROLE_CONTEXTUAL
    merged = embeds.clone()
    others = rest[~is_target[rest]]
    if others.numel():
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        choice = (unit[others] @ unit[targets].T).argmax(dim=1)
        sums = torch.zeros(targets.numel(), embeds.shape[1], dtype=torch.float32, device=embeds.device)
        sums.index_add_(0, choice, embeds[others].float())
        counts = torch.bincount(choice, minlength=targets.numel()).to(torch.float32).unsqueeze(1)
        base = embeds[targets].float()
        if merge == "reference":
            new = torch.where(counts > 0, base + sums / counts.clamp(min=1), base)
        else:
            new = (base + sums) / (counts + 1)
        merged[targets] = new.to(embeds.dtype)
    kept = roles > ROLE_PRUNED
    return roles, merged[kept]


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
) -> SliceSelection:
    """Stage 2 for one slice: nucleus probabilities always (for the heatmap), selection if enabled.

    `budget` replaces the nucleus by the top `budget` share of tokens (benchmark operating points).
    """
    if token_filter:
        if budget is None:
            probs, selected = nucleus(scores, tau, temperature)
        else:
            probs, selected = top_fraction(scores, budget, temperature)
        roles, kept = contextual_merge(embeds, keys, selected, contextual_ratio, merge)
        return SliceSelection(roles=roles, probs=probs, kept_embeds=kept)
    probs = torch.softmax(scores.to(torch.float64) / temperature, dim=-1)
    roles = torch.full((embeds.shape[0],), ROLE_NUCLEUS, dtype=torch.uint8, device=embeds.device)
    return SliceSelection(roles=roles, probs=probs, kept_embeds=embeds)
