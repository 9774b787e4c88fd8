"""The fast decoder (static KV cache; CUDA graphs on CUDA) against the reference eager dynamic-cache decoder:
the same greedy ids for every family, pruning on and off, fresh asks and follow-ups; one static graph
per decode step (what lets CUDA replay a single captured step); the path taken reported."""
from __future__ import annotations

import pytest
import torch

from medpruner import InputError, MedPruner, PruningConfig
from medpruner import engine as engine_module
from medpruner.tiny import TINY_FAMILIES, build_tiny_checkpoint
from test_adapters_common import make_slices

QUESTIONS = ("Is there a liver lesion?", "Describe the kidneys and the spleen in detail.")
SIZES = {"qwen3_vl": 224, "qwen2_5_vl": 168, "gemma3": 128}
CONFIGS = {"pruned": PruningConfig(), "unpruned": PruningConfig(enabled=False)}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_engine(request, tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}", family=request.param)
    return request.param, MedPruner.from_pretrained(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def slices(family_engine):
    return make_slices(SIZES[family_engine[0]])


def _ask(engine, source, question, config, decode, **options):
    return engine.ask(source, question, config, max_new_tokens=options.pop("max_new_tokens", 24),
                      decode=decode, **options)


@pytest.mark.parametrize("pruning", CONFIGS)
def test_static_cache_gives_the_eager_greedy_ids(family_engine, slices, pruning):
    family, engine = family_engine
    config = CONFIGS[pruning]
    prepared = engine.prepare(slices, config)
    for question in QUESTIONS:
        for source in (slices, prepared):          # a fresh ask, then a follow-up on the prepared prefix
            for ignore_eos in (True, False):
                eager = _ask(engine, source, question, config, "dynamic", ignore_eos=ignore_eos)
                fast = _ask(engine, source, question, config, "static", ignore_eos=ignore_eos)
                assert fast.token_ids == eager.token_ids, (family, pruning, question, source is prepared)
                assert fast.answer == eager.answer
                assert eager.decode_path == "dynamic-cache (eager)" and fast.decode_path == "static-cache"
            assert len(set(eager.token_ids)) > 1, "a degenerate model would make this comparison weak"
    if family == "gemma3":     # the sliding-window layers really slide over the kept prompt
        window = engine.model.config.get_text_config().sliding_window
        assert fast.counts["prompt_tokens_pruned"] > window


def test_auto_is_static_on_cpu_and_cuda_graph_falls_back(family_engine, slices):
    _, engine = family_engine
    reference = _ask(engine, slices, QUESTIONS[0], None, "dynamic", ignore_eos=True)
    for decode in ("auto", "cuda-graph", None):
        result = _ask(engine, slices, QUESTIONS[0], None, decode, ignore_eos=True)
        assert result.decode_path == "static-cache" and result.token_ids == reference.token_ids
        assert result.to_dict()["decode_path"] == "static-cache"
    with pytest.raises(InputError):
        _ask(engine, slices, QUESTIONS[0], None, "compiled")


def test_followups_on_static_caches_leave_the_prefix_alone(family_engine, slices):
    _, engine = family_engine
    prepared = engine.prepare(slices, PruningConfig())
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prepared.prefix.cache.layers]
    first = _ask(engine, prepared, QUESTIONS[0], None, "static", ignore_eos=True)
    _ask(engine, prepared, QUESTIONS[1], None, "static", ignore_eos=True)
    again = _ask(engine, prepared, QUESTIONS[0], None, "static", ignore_eos=True)
    assert again.token_ids == first.token_ids and again.prefix_reused
    for (keys, values), layer in zip(before, prepared.prefix.cache.layers, strict=True):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


@pytest.mark.parametrize("source", ["fresh", "follow-up"])
def test_the_decode_step_is_one_static_graph(family_engine, slices, source, monkeypatch):
    """Dynamo traces the whole step (fullgraph: no host sync, no data-dependent branch) ONCE for every
    step (no guard on a counter that moves): what a single captured CUDA graph needs to stay right."""
    from torch._dynamo.utils import counters

    family, engine = family_engine
    reference = _ask(engine, slices, QUESTIONS[1], None, "dynamic", ignore_eos=True, max_new_tokens=10)
    step = engine_module._StaticDecoder._step
    compiled = torch.compile(step, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setattr(engine_module._StaticDecoder, "_step", lambda self: compiled(self))
    torch._dynamo.reset()
    counters.clear()
    target = slices if source == "fresh" else engine.prepare(slices, PruningConfig())
    result = _ask(engine, target, QUESTIONS[1], None, "static", ignore_eos=True, max_new_tokens=10)
    assert result.token_ids == reference.token_ids, family
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decoder_gives_the_eager_ids(family_engine, slices):
    family, engine = family_engine
    engine.model.to("cuda")
    try:
        for source in (slices, engine.prepare(slices, PruningConfig())):
            eager = _ask(engine, source, QUESTIONS[0], None, "dynamic", ignore_eos=True)
            fast = _ask(engine, source, QUESTIONS[0], None, "cuda-graph", ignore_eos=True)
            assert fast.decode_path == "static-cache+cuda-graph", fast.decode_path
            assert fast.token_ids == eager.token_ids, family
    finally:
        engine.model.to("cpu")


@pytest.mark.parametrize("renumber", [False, True])
def test_followup_question_positions_are_the_full_prompts(family_engine, slices, renumber, monkeypatch):
    """A follow-up takes its question's positions from the prefix (no pass over the whole prompt);
    they must be those of the full prompt, in both position modes, pruning on and off."""
    _, engine = family_engine
    default = engine.adapter.renumber_positions
    engine.adapter.renumber_positions = renumber
    try:
        last_dropped = {"slice_mask": [True] * (len(slices) - 1) + [False], "token_budget": 0.1}
        for config, options in ((CONFIGS["pruned"], {}), (CONFIGS["unpruned"], {}), (CONFIGS["pruned"], last_dropped)):
            # (with the last slice dropped, the largest position of the prefix belongs to a pruned token)
            prepared = engine.prepare(slices, config, **options)
            assert prepared.prefix.text_position is not None
            length = prepared.prefix.ids.shape[1]
            for question in (*QUESTIONS, "?"):
                ids, positions, next_position, _, _ = engine._full_prompt(prepared, question)
                with monkeypatch.context() as patch:
                    patch.setattr(engine, "_full_prompt", None)     # the follow-up path must not need it
                    _, _, follow_next, full_length, _ = engine._prefill_question(prepared, question, True, room=4)
                assert follow_next == next_position and full_length == ids.shape[1]
                start = prepared.prefix.text_position
                assert torch.equal(positions[:, length:], start + torch.arange(ids.shape[1] - length).expand_as(
                    positions[:, length:]))
                fresh = engine.ask(slices, question, config, max_new_tokens=6, ignore_eos=True, **options)
                followup = engine.ask(prepared, question, max_new_tokens=6, ignore_eos=True)
                assert followup.token_ids == fresh.token_ids
    finally:
        engine.adapter.renumber_positions = default
