"""Follow-up questions reuse the pruned visual prefix and its KV cache, and answer exactly like a fresh ask."""
from __future__ import annotations

import numpy as np
import torch

from medpruner import PruningConfig

QUESTIONS = ("Is there a liver lesion?", "Where is it?", "Is the spleen normal?")


def test_followups_equal_fresh_asks_in_any_order(engine, redundant_slices):
    config = PruningConfig(tau=0.7)
    prepared = engine.prepare(redundant_slices, config)
    assert prepared.prefix is not None and prepared.prefix.kept_length < prepared.prefix.ids.shape[1]
    for question in (*QUESTIONS, QUESTIONS[0]):   # asking again must not see earlier questions in the cache
        followup = engine.ask(prepared, question, max_new_tokens=8)
        fresh = engine.ask(redundant_slices, question, config, max_new_tokens=8)
        assert followup.token_ids == fresh.token_ids
        assert followup.prefix_reused and not fresh.prefix_reused
        assert followup.counts == fresh.counts
        assert followup.timings["vision"] == followup.timings["pruning"] == 0.0
        assert fresh.timings["vision"] > 0
    assert prepared.prefix.cache.get_seq_length() == prepared.prefix.kept_length, "the cached prefix must stay as it was"


def test_followup_logits_match_a_one_shot_prefill(engine, redundant_slices):
    """The question's logits on top of the cached prefix equal those of prefilling the whole pruned prompt at once."""
    config = PruningConfig(tau=0.6)
    prepared = engine.prepare(redundant_slices, config)
    logits, *_ = engine._prefill_question(prepared, QUESTIONS[1], copy_prefix=True)
    one_shot = engine.prefill_logits(prepared, QUESTIONS[1])
    torch.testing.assert_close(logits[-1], one_shot[-1], atol=1e-5, rtol=0)


def test_unpruned_followup_is_still_the_stock_model(engine, redundant_slices):
    from test_engine_exactness import stock_inputs

    prepared = engine.prepare(redundant_slices, PruningConfig(enabled=False))
    engine.ask(prepared, QUESTIONS[0], max_new_tokens=4)
    inputs = stock_inputs(engine, redundant_slices, QUESTIONS[2])
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert engine.ask(prepared, QUESTIONS[2], max_new_tokens=10).token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_prepared_volumes_never_share_a_prefix(engine, redundant_slices):
    other = np.ascontiguousarray(redundant_slices[::-1])
    first = engine.prepare(redundant_slices, PruningConfig())
    second = engine.prepare(other, PruningConfig())
    loose = engine.prepare(redundant_slices, PruningConfig(tau=1.0, gamma=0.0))
    answers = {
        "first": engine.ask(first, QUESTIONS[0], max_new_tokens=8).token_ids,
        "second": engine.ask(second, QUESTIONS[0], max_new_tokens=8).token_ids,
        "loose": engine.ask(loose, QUESTIONS[0], max_new_tokens=8).token_ids,
    }
    assert answers["first"] == engine.ask(redundant_slices, QUESTIONS[0], PruningConfig(), max_new_tokens=8).token_ids
    assert answers["second"] == engine.ask(other, QUESTIONS[0], PruningConfig(), max_new_tokens=8).token_ids
    assert answers["loose"] == engine.ask(redundant_slices, QUESTIONS[0], PruningConfig(tau=1.0, gamma=0.0),
                                          max_new_tokens=8).token_ids
    assert first.prefix.cache is not second.prefix.cache is not loose.prefix.cache


def test_without_a_cached_prefix_the_answer_is_the_same(engine, redundant_slices):
    config = PruningConfig(tau=0.8)
    bare = engine.prepare(redundant_slices, config, cache_prefix=False)
    assert bare.prefix is None
    result = engine.ask(bare, QUESTIONS[1], max_new_tokens=8)
    assert not result.prefix_reused
    assert result.token_ids == engine.ask(redundant_slices, QUESTIONS[1], config, max_new_tokens=8).token_ids
