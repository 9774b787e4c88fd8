"""Property tests of the selection rules: the slice filter, the nucleus and the contextual merge."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medpruner.pruning import ROLE_CONTEXTUAL, ROLE_NUCLEUS, ROLE_PRUNED, contextual_merge, nucleus, slice_filter

scores_strategy = arrays(np.float32, st.integers(1, 200), elements=st.floats(-20, 20, width=32))
taus = st.floats(0.01, 1.0)
temperatures = st.floats(0.1, 10.0)


@settings(max_examples=200, deadline=None)
@given(scores=scores_strategy, tau=taus, temperature=temperatures)
def test_nucleus_reaches_tau_with_the_fewest_tokens(scores, tau, temperature):
    probs, selected = nucleus(torch.from_numpy(scores), tau, temperature)
    p = probs.numpy()
    assert np.isclose(p.sum(), 1.0)
    count = int(selected.sum())
    assert count >= 1
    mass = p[selected.numpy()].sum()
    if count < p.size:
        assert mass >= tau - 1e-12
    # Minimal: the `count - 1` largest probabilities do not reach tau (up to summation-order rounding).
    top = np.sort(p)[::-1]
    assert top[: count - 1].sum() < tau + 1e-9
    # It is the top of the distribution: every selected token is at least as likely as every other one.
    if count < p.size:
        assert p[selected.numpy()].min() >= p[~selected.numpy()].max()


@settings(max_examples=100, deadline=None)
@given(scores=scores_strategy, temperature=temperatures)
def test_tau_one_keeps_every_token(scores, temperature):
    _, selected = nucleus(torch.from_numpy(scores), 1.0, temperature)
    assert bool(selected.all())


stacks = arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 6), st.integers(1, 6)),
                elements=st.integers(0, 3))


def _reference_filter(x: np.ndarray, gamma: float):
    kept, anchor, l1 = [0], x[0], [np.nan]
    for i in range(1, len(x)):
        d = np.abs(x[i].astype(np.float64) - anchor).mean()
        l1.append(d)
        if d > gamma:
            kept.append(i)
            anchor = x[i]
    return kept, np.array(l1)


@settings(max_examples=200, deadline=None)
@given(stack=stacks, gamma=st.floats(0, 2))
def test_slice_filter_is_the_anchor_rule(stack, gamma):
    kept, l1 = slice_filter(torch.from_numpy(stack.astype(np.float32)), gamma)
    expected, expected_l1 = _reference_filter(stack, gamma)
    assert kept[0]
    assert np.flatnonzero(kept).tolist() == expected
    assert np.isnan(l1[0])
    np.testing.assert_allclose(l1[1:], expected_l1[1:], rtol=1e-5, atol=1e-6)
    assert np.all(l1[1:][kept[1:]] > gamma) and np.all(l1[1:][~kept[1:]] <= gamma)


@settings(max_examples=100, deadline=None)
@given(stack=stacks)
def test_gamma_zero_keeps_every_slice_that_differs_from_its_anchor(stack):
    kept, _ = slice_filter(torch.from_numpy(stack.astype(np.float32)), 0.0)
    anchor = stack[0]
    for i in range(1, len(stack)):
        differs = bool((stack[i] != anchor).any())
        assert kept[i] == differs
        if differs:
            anchor = stack[i]


@settings(max_examples=50, deadline=None)
@given(stack=stacks, repeats=st.integers(1, 4))
def test_identical_slices_are_dropped(stack, repeats):
    doubled = np.repeat(stack, repeats + 1, axis=0)   # every slice followed by exact copies
    kept, _ = slice_filter(torch.from_numpy(doubled.astype(np.float32)), 0.0)
    copies = np.ones(len(doubled), dtype=bool)
    copies[:: repeats + 1] = False
    assert not kept[copies].any()


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(2, 120),
    dim=st.integers(2, 8),
    ratio=st.floats(0, 0.99),
    merge=st.sampled_from(["reference", "mean"]),
    seed=st.integers(0, 2**31 - 1),
    keep_share=st.floats(0, 1),
)
def test_contextual_merge_partitions_and_conserves(n, dim, ratio, merge, seed, keep_share):
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(n, dim, generator=gen)
    keys = torch.randn(n, dim, generator=gen)
    selected = torch.rand(n, generator=gen) < keep_share
    roles, merged = contextual_merge(embeds, keys, selected, ratio, merge)
    kept = merged[roles > 0]
    rest = int((~selected).sum())
    n_ctx = max(int(ratio * n), 1)
    assert int((roles == ROLE_NUCLEUS).sum()) == int(selected.sum())
    assert int((roles == ROLE_CONTEXTUAL).sum()) == min(n_ctx, rest)
    assert int((roles == ROLE_PRUNED).sum()) == rest - min(n_ctx, rest)
    assert kept.shape == (int((roles > 0).sum()), dim)
    # Nucleus tokens pass through untouched, in raster order.
    kept_roles = roles[roles > 0]
    assert torch.equal(kept[kept_roles == ROLE_NUCLEUS], embeds[roles == ROLE_NUCLEUS])
    if merge == "mean" and rest:
        # A mean merge conserves the total embedding mass of the non-nucleus tokens, weighted by group size.
        contextual = roles == ROLE_CONTEXTUAL
        unit = torch.nn.functional.normalize(keys, dim=-1)
        targets = torch.nonzero(contextual).flatten()
        others = torch.nonzero(roles == ROLE_PRUNED).flatten()
        choice = (unit[others] @ unit[targets].T).argmax(1) if others.numel() else torch.empty(0, dtype=torch.long)
        sizes = 1 + torch.bincount(choice, minlength=targets.numel())
        merged = kept[kept_roles == ROLE_CONTEXTUAL]
        total = (merged * sizes[:, None]).sum(0)
        torch.testing.assert_close(total, embeds[~selected].sum(0), atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    slices=st.integers(1, 6),
    n=st.integers(2, 60),
    tau=taus,
    ratio=st.floats(0, 0.5),
    merge=st.sampled_from(["reference", "mean"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_all_slices_at_once_equals_one_slice_at_a_time(slices, n, tau, ratio, merge, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(slices, n, generator=gen) * 3
    embeds = torch.randn(slices, n, 5, generator=gen)
    keys = torch.randn(slices, n, 4, generator=gen)
    probs, selected = nucleus(scores, tau, 2.0)
    roles, merged = contextual_merge(embeds, keys, selected, ratio, merge)
    for row in range(slices):
        p1, s1 = nucleus(scores[row], tau, 2.0)
        r1, m1 = contextual_merge(embeds[row], keys[row], s1, ratio, merge)
        assert torch.equal(s1, selected[row]) and torch.allclose(p1, probs[row])
        assert torch.equal(r1, roles[row])
        torch.testing.assert_close(m1, merged[row])
