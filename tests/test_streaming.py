"""Streaming the answer's text: the deltas `ask(on_text=...)` passes concatenate exactly to the answer."""
from __future__ import annotations

import numpy as np
import pytest

from medpruner import MedPruner, PruningConfig
from medpruner.engine import TextStream
from medpruner.tiny import TINY_FAMILIES, build_tiny_checkpoint
from test_adapters_common import make_slices

QUESTIONS = ("Is there a liver lesion?", "Describe the kidneys.", "What is the largest lesion size in mm?")
SIZES = {"qwen3_vl": 224, "qwen2_5_vl": 168, "gemma3": 128}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_engine(request, tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}", family=request.param)
    return request.param, MedPruner.from_pretrained(path, device="cpu", dtype="float32")


def _collect():
    calls: list[tuple[str, str]] = []
    return calls, lambda delta, text: calls.append((delta, text))


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_deltas_concatenate_to_the_answer(family_engine, ignore_eos):
    family, engine = family_engine
    slices = make_slices(SIZES[family])[:4]
    for question in QUESTIONS:
        calls, on_text = _collect()
        streamed = engine.ask(slices, question, max_new_tokens=20, ignore_eos=ignore_eos, on_text=on_text)
        plain = engine.ask(slices, question, max_new_tokens=20, ignore_eos=ignore_eos)
        assert streamed.token_ids == plain.token_ids and streamed.answer == plain.answer
        assert len(calls) == len(streamed.token_ids)            # one call per generated token
        assert "".join(delta for delta, _ in calls) == streamed.answer
        text = ""
        for delta, so_far in calls:
            text += delta
            assert so_far == text and streamed.answer.startswith(so_far)
        if ignore_eos:
            assert len(streamed.token_ids) == 20


def test_followups_stream_too(family_engine):
    family, engine = family_engine
    prepared = engine.prepare(make_slices(SIZES[family])[:4], PruningConfig())
    for question in QUESTIONS:
        calls, on_text = _collect()
        result = engine.ask(prepared, question, max_new_tokens=20, ignore_eos=True, on_text=on_text)
        assert "".join(delta for delta, _ in calls) == result.answer


def test_random_ids_with_broken_characters_and_special_tokens(family_engine):
    """Random ids of the byte-level tokenizer: split multi-byte characters, invalid bytes, special tokens."""
    _, engine = family_engine
    tokenizer = engine.tokenizer
    rng = np.random.default_rng(0)
    special = sorted(tokenizer.all_special_ids)
    # Ids of whole multi-byte characters, and of the single bytes they are made of.
    pieces = [i for c in "é€😀 ab\n" for i in tokenizer.encode(c, add_special_tokens=False)]
    for trial in range(200):
        length = int(rng.integers(1, 40))
        pool = rng.choice(3, size=length, p=[0.6, 0.3, 0.1])
        ids = [int(rng.integers(0, len(tokenizer))) if kind == 0 else
               int(rng.choice(pieces)) if kind == 1 else int(rng.choice(special)) for kind in pool]
        calls, on_text = _collect()
        stream = TextStream(tokenizer, on_text)
        for index, token in enumerate(ids):
            stream.push(token, last=index == len(ids) - 1)
        expected = tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert "".join(delta for delta, _ in calls) == expected, (trial, ids)


def test_a_split_character_is_held_back_until_complete(family_engine):
    _, engine = family_engine
    tokenizer = engine.tokenizer
    ids = tokenizer.encode("a😀b", add_special_tokens=False)
    calls, on_text = _collect()
    stream = TextStream(tokenizer, on_text)
    for index, token in enumerate(ids):
        stream.push(token, last=index == len(ids) - 1)
    assert "".join(delta for delta, _ in calls) == "a😀b"
    assert all("\ufffd" not in text for _, text in calls)


def test_whitespace_is_held_until_text_follows():
    class Chars:      # one character per id: id i is chr(i)
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    calls, on_text = _collect()
    stream = TextStream(Chars(), on_text)
    text = "  a b\n c \n"
    for index, char in enumerate(text):
        stream.push(ord(char), last=index == len(text) - 1)
    assert [delta for delta, _ in calls] == ["", "", "a", "", " b", "", "", "\n c", "", ""]
