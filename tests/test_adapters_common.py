"""What every model family must do the same way: registry, loading, geometry facts, the position option,
follow-ups, and the demo; plus the explicit (test-side) MedPruner helpers the family tests share."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medpruner import InputError, MedPruner, ModelLoadError, PruningConfig
from medpruner.adapters import ADAPTERS, SUPPORTED_FAMILIES, adapter_for
from medpruner.tiny import TINY_FAMILIES, build_tiny_checkpoint

QUESTION = "Is there a liver lesion?"


# -- explicit computations shared by the family tests (independent of medpruner.pruning) ------------
def explicit_slice_filter(pixels: torch.Tensor, gamma: float) -> list[int]:
    """Stage 1 written out: pixels (S, ...) -> indices of the kept slices."""
    kept, anchor = [0], pixels[0]
    for i in range(1, pixels.shape[0]):
        if float((pixels[i].float() - anchor.float()).abs().mean()) > gamma:
            kept.append(i)
            anchor = pixels[i]
    return kept


def explicit_selection(scores, keys, embeds, tau, temperature, ratio):
    """Stage 2 written out token by token: (roles uint8 (n,), merged embeddings of kept tokens, kept indices)."""
    n = len(scores)
    logits = np.asarray(scores, dtype=np.float64) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = sorted(range(n), key=lambda i: -p[i])  # Python's sort is stable
    selected, mass = set(), 0.0
    for i in order:
        if mass >= tau:
            break
        selected.add(i)
        mass += p[i]
    rest = [i for i in range(n) if i not in selected]
    roles = np.array([2 if i in selected else 0 for i in range(n)], dtype=np.uint8)
    merged = {i: embeds[i].clone() for i in range(n)}
    if rest:
        n_ctx = max(int(ratio * n), 1)
        step = max(1, len(rest) // n_ctx)
        targets = rest[::step][:n_ctx]
        assigned = {t: [] for t in targets}
        for i in rest:
            if i in assigned:
                continue
            sims = [float(torch.dot(keys[i], keys[t]) / (keys[i].norm() * keys[t].norm())) for t in targets]
            assigned[targets[int(np.argmax(sims))]].append(i)
        for t in targets:
            roles[t] = 1
            if assigned[t]:
                merged[t] = embeds[t] + torch.stack([embeds[i] for i in assigned[t]]).mean(0)
    kept = [i for i in range(n) if roles[i] > 0]
    return roles, torch.stack([merged[i] for i in kept]), kept


def keep_mask(ids: torch.Tensor, image_token_id: int, token_role, tokens_per_slice: int) -> torch.Tensor:
    """(L,) bool over the full prompt: text tokens and the visual tokens whose role is not pruned."""
    image_positions = torch.nonzero(ids[0] == image_token_id).flatten().tolist()
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    for s, role in enumerate(token_role):
        for t in range(tokens_per_slice):
            keep[image_positions[s * tokens_per_slice + t]] = bool(role is not None and role.ravel()[t] > 0)
    return keep


def make_slices(size: int, seed: int = 7) -> np.ndarray:
    """8 slices with exact repeats (the slice filter must drop them) and distinct ones."""
    rng = np.random.default_rng(seed)
    distinct = rng.integers(0, 256, size=(5, size, size, 3), dtype=np.uint8)
    return distinct[[0, 0, 1, 2, 2, 2, 3, 4]]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_engine(request, tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}", family=request.param)
    return request.param, path, MedPruner.from_pretrained(path, device="cpu", dtype="float32")


# -- scoring helper -----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [64, 4096, 40_000, 2**28])
def test_received_attention_is_the_same_in_any_chunking(budget):
    """Chunked over groups and queries (a budget of a few rows, or whole groups) = the plain formula."""
    from medpruner.adapters.base import received_attention

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 2, 37, 8, generator=gen), torch.randn(3, 2, 37, 8, generator=gen)
    plain = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1).mean(dim=1).sum(dim=1)
    for method in ("blocks", "auto"):   # the block path at this budget, and whatever path the engine takes
        torch.testing.assert_close(received_attention(q, k, 0.3, budget_bytes=budget, method=method), plain,
                                   atol=1e-5, rtol=1e-5)


# -- registry and loading ---------------------------------------------------------------------------
def test_registry_covers_the_three_families():
    assert SUPPORTED_FAMILIES == ("gemma3", "qwen2_5_vl", "qwen3_vl")
    assert set(TINY_FAMILIES) == set(SUPPORTED_FAMILIES)
    for model_type, adapter in ADAPTERS.items():
        assert adapter_for(model_type) is adapter and model_type in adapter.model_types
    assert adapter_for("llama") is None and adapter_for(None) is None
    assert adapter_for("gemma3").renumber_positions_default is True
    assert adapter_for("qwen2_5_vl").renumber_positions_default is False
    assert adapter_for("qwen3_vl").renumber_positions_default is False


def test_unsupported_checkpoint_lists_every_supported_family(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'llama' model, which MedPruner does not support") as err:
        MedPruner.from_pretrained(tmp_path)
    assert err.value.hint == "Supported model families: gemma3, qwen2_5_vl, qwen3_vl."


def test_each_tiny_checkpoint_loads_with_its_adapter_and_geometry(family_engine):
    family, path, engine = family_engine
    adapter = engine.adapter
    assert adapter.family == family == json.loads((path / "config.json").read_text())["model_type"]
    assert isinstance(adapter.model, adapter.model_class())
    assert adapter.preferred_slice_size % adapter.token_pixels == 0
    assert isinstance(adapter.default_max_slices, int) and adapter.default_max_slices > 0
    # A slice of the preferred size goes through the processor unchanged in size, and its token grid
    # tiles it with squares of token_pixels.
    side = adapter.preferred_slice_size
    pixels = adapter.preprocess([np.zeros((side, side, 3), np.uint8)])
    assert pixels.image_size == (side, side)
    h, w = pixels.token_grid
    assert (h * adapter.token_pixels, w * adapter.token_pixels) == (side, side)
    expected = {"gemma3": (128, 32), "qwen2_5_vl": (168, 28), "qwen3_vl": (224, 32)}[family]
    assert (adapter.preferred_slice_size, adapter.token_pixels) == expected


def test_renumber_option_is_validated_and_overrides_the_default(family_engine):
    _, path, engine = family_engine
    assert engine.adapter.renumber_positions is engine.adapter.renumber_positions_default
    with pytest.raises(InputError, match="renumber_positions"):
        MedPruner.from_pretrained(path, renumber_positions="yes")
    flipped = MedPruner.from_pretrained(path, dtype="float32", renumber_positions=not engine.adapter.renumber_positions)
    assert flipped.adapter.renumber_positions is not engine.adapter.renumber_positions


def test_positions_follow_the_option(family_engine):
    """Original positions are the full prompt's, filtered; renumbered ones are 0..L'-1 in every row."""
    _, path, engine = family_engine
    slices = make_slices(engine.adapter.preferred_slice_size)
    config = PruningConfig(tau=0.6, contextual_ratio=0.1)
    prepared = engine.prepare(slices, config, cache_prefix=False)
    engines = {
        flag: MedPruner.from_pretrained(path, dtype="float32", renumber_positions=flag) for flag in (False, True)
    }
    full_ids, original, original_next, _, keep = engines[False]._full_prompt(prepared, QUESTION)
    _, renumbered, renumbered_next, _, keep_again = engines[True]._full_prompt(prepared, QUESTION)
    assert torch.equal(keep, keep_again) and int(keep.sum()) < keep.numel()
    kept = int(keep.sum())
    assert torch.equal(renumbered[:, keep], torch.arange(kept).expand(renumbered.shape[0], kept))
    assert renumbered_next == kept
    stock, stock_next = engine.adapter.positions(full_ids, prepared.num_slices, prepared.pixels)
    assert torch.equal(original, stock) and original_next == stock_next
    # And the engine really feeds those positions to the model: the prefills differ.
    a = engines[False].prefill_logits(prepared, QUESTION)
    b = engines[True].prefill_logits(prepared, QUESTION)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_followups_equal_fresh_asks(family_engine):
    engine = family_engine[2]
    slices = make_slices(engine.adapter.preferred_slice_size)
    config = PruningConfig(tau=0.7)
    prepared = engine.prepare(slices, config)
    for question in (QUESTION, "Where is it?"):
        followup = engine.ask(prepared, question, max_new_tokens=6)
        fresh = engine.ask(slices, question, config, max_new_tokens=6)
        assert followup.token_ids == fresh.token_ids and followup.prefix_reused
    logits, *_ = engine._prefill_question(prepared, "Where is it?", copy_prefix=True)
    torch.testing.assert_close(logits[-1], engine.prefill_logits(prepared, "Where is it?")[-1], atol=1e-5, rtol=0)


def test_capture_does_not_change_the_encoder_output(family_engine):
    engine = family_engine[2]
    adapter = engine.adapter
    pixels = adapter.preprocess(list(make_slices(adapter.preferred_slice_size)[:3]))
    calls = []
    timing_hook = adapter.vision_encoder.register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():
        captured = adapter.encode(pixels)
        plain = adapter.encode(pixels, capture=False)
    timing_hook.remove()
    assert len(calls) == 2, "vision_encoder must be the module encode runs (the benchmark times it)"
    assert torch.equal(captured.embeds, plain.embeds)
    assert plain.scores is None and plain.keys is None
    h, w = pixels.token_grid
    assert captured.scores.shape == (3, h * w) and captured.keys.shape[:2] == (3, h * w)
    assert captured.embeds.shape[:2] == (3, h * w)
    for module in adapter.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, "hooks must be removed after encoding"


def test_demo_runs_with_each_family(family_engine, tmp_path, monkeypatch, capsys):
    import SimpleITK as sitk
    from medpruner.cli import main

    family, path, _ = family_engine
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"tiny-{family}").symlink_to(path, target_is_directory=True)   # the demo finds it built
    monkeypatch.setenv("MEDPRUNER_CACHE", str(cache))
    out = tmp_path / "demo"
    assert main(["demo", "--family", family, "--out", str(out), "--max-new-tokens", "4", "--device", "cpu",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_family"] == family
    sample = sitk.ReadImage(str(out / "sample_ct.nrrd"))
    kept = sitk.ReadImage(str(out / "heatmap_kept.nrrd"))
    assert kept.GetSize() == sample.GetSize()
    labels = set(np.unique(sitk.GetArrayViewFromImage(kept)).tolist())
    assert 4 in labels, "the heatmap must show kept tokens"
