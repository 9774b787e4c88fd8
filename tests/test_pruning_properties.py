"""Property tests of the selection rules: the slice filter, the nucleus and the contextual merge."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume, given, settings
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


# -- independent references of the nucleus rule and of the merge (numpy, float64, written out) ----------
def _reference_nucleus(scores: np.ndarray, tau: float, temperature: float) -> tuple[np.ndarray, np.ndarray, int]:
    """p = softmax(scores / T); tokens by p descending, ties in raster order; the shortest prefix reaching tau.

    Returns (p, cumulative mass in that order, count kept)."""
    z = scores.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    mass = np.cumsum(p[order])
    reached = np.flatnonzero(mass >= tau)
    return p, mass, (int(reached[0]) + 1 if reached.size else p.size)


@settings(max_examples=200, deadline=None)
@given(scores=scores_strategy, tau=st.floats(0.01, 0.99), temperatures=st.tuples(temperatures, temperatures))
def test_nucleus_follows_the_softmax_at_its_temperature(scores, tau, temperatures):
    """Probabilities and kept count are those of softmax(scores / T) at EACH of two temperatures."""

    for temperature in temperatures:
        p_ref, mass, count = _reference_nucleus(scores, tau, temperature)
        # Summation order may round a mass within 1e-9 of tau either way: such boundaries decide nothing.
        assume(np.all(np.abs(mass - tau) > 1e-9))
        probs, selected = nucleus(torch.from_numpy(scores), tau, temperature)
        np.testing.assert_allclose(probs.numpy(), p_ref, rtol=1e-9, atol=1e-300)
        assert int(selected.sum()) == count
        assert p_ref[selected.numpy()].sum() >= tau or count == scores.size


def test_nucleus_count_depends_on_the_temperature():
    """A softer distribution needs more tokens to reach tau: the property above can tell temperatures apart."""
    scores = np.linspace(-4.0, 4.0, 50, dtype=np.float32)
    counts = {}
    for temperature in (0.5, 1.0, 4.0):
        _, selected = nucleus(torch.from_numpy(scores), 0.9, temperature)
        counts[temperature] = int(selected.sum())
        assert counts[temperature] == _reference_nucleus(scores, 0.9, temperature)[2]
    assert counts[0.5] < counts[1.0] < counts[4.0]


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 3),
    n=st.integers(17, 1500),        # torch's unstable CPU sort reorders ties from 17 elements on
    levels=st.integers(1, 5),
    tau=st.floats(0.01, 0.99),
    temperature=temperatures,
    seed=st.integers(0, 2**31 - 1),
)
def test_nucleus_breaks_ties_in_raster_order(rows, n, levels, tau, temperature, seed):
    """Scores on a few levels (many exact ties): the kept set is the first tokens in raster order among ties."""

    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, levels, size=(rows, n)) * 1.5).astype(np.float32)
    _, selected = nucleus(torch.from_numpy(scores), tau, temperature)
    for row in range(rows):
        _, mass, count = _reference_nucleus(scores[row], tau, temperature)
        assume(np.all(np.abs(mass - tau) > 1e-9))
        expected = np.zeros(n, dtype=bool)
        expected[np.argsort(-scores[row], kind="stable")[:count]] = True   # levels are far apart: order of p
        np.testing.assert_array_equal(selected[row].numpy(), expected)


def _reference_merge(embeds: np.ndarray, keys: np.ndarray, selected: np.ndarray, ratio: float, merge: str):
    """The documented merge, token by token in float64.

    Returns (roles, merged, plain mean of each group, whether any target absorbed a token), or None when
    two targets' similarities to one token are within rounding (the first-target tie rule is then untestable).
    """
    n = len(embeds)
    rest = [i for i in range(n) if not selected[i]]
    n_ctx = max(int(ratio * n), 1)
    step = max(1, len(rest) // n_ctx)
    targets = rest[::step][:n_ctx]
    roles = np.where(selected, ROLE_NUCLEUS, ROLE_PRUNED).astype(np.uint8)
    roles[targets] = ROLE_CONTEXTUAL
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for i in rest:
        if i in groups:
            continue
        sims = unit[targets] @ unit[i]
        best = int(np.argmax(sims))
        if len(targets) > 1 and np.sort(sims)[-1] - np.sort(sims)[-2] < 1e-5:
            return None
        groups[targets[best]].append(i)
    merged = embeds.astype(np.float64)
    plain = merged.copy()
    for t, absorbed in groups.items():
        group_sum = embeds[t] + embeds[absorbed].sum(axis=0)
        plain[t] = group_sum / (1 + len(absorbed))
        if merge == "mean":
            merged[t] = plain[t]
        elif absorbed:   # "reference": the target itself plus the mean of what it absorbed
            merged[t] = embeds[t] + embeds[absorbed].mean(axis=0)
    return roles, merged, plain, any(groups.values())


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 120),
    dim=st.integers(2, 8),
    ratio=st.floats(0, 0.5),
    merge=st.sampled_from(["reference", "mean"]),
    seed=st.integers(0, 2**31 - 1),
    keep_share=st.floats(0, 1),
)
def test_contextual_merge_is_the_documented_formula(n, dim, ratio, merge, seed, keep_share):
    """Each mode equals its formula written out; in reference mode that is NOT the plain group mean."""

    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((n, dim)).astype(np.float32)
    keys = rng.standard_normal((n, dim)).astype(np.float32)
    selected = rng.random(n) < keep_share
    reference = _reference_merge(embeds, keys, selected, ratio, merge)
    assume(reference is not None)
    roles_ref, merged_ref, plain, absorbed_any = reference
    roles, merged = contextual_merge(torch.from_numpy(embeds), torch.from_numpy(keys), torch.from_numpy(selected),
                                     ratio, merge)
    np.testing.assert_array_equal(roles.numpy(), roles_ref)
    np.testing.assert_allclose(merged.numpy(), merged_ref, rtol=1e-5, atol=1e-5)
    if merge == "reference" and absorbed_any:
        assert not np.allclose(merged_ref, plain, rtol=1e-3, atol=1e-3), "the example cannot tell the two modes apart"
