"""Qwen2.5-VL adapter against the stock model: exact with pruning off, equal to an explicit computation
with it on, and the last vision block's attention captured in the ORIGINAL patch order whatever the
kind of block (windowed or full)."""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.vision_utils import get_vision_window_index

from medpruner import MedPruner, PruningConfig
from medpruner.tiny import build_tiny_checkpoint
from test_adapters_common import QUESTION, explicit_selection, explicit_slice_filter, keep_mask, make_slices

SIZE = 168              # 12x12 patches of 14 px, 6x6 LLM tokens of 28 px
TOKENS = 36
PATCHES = 144


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2_5_vl", family="qwen2_5_vl")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return MedPruner.from_pretrained(checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def slices():
    return make_slices(SIZE)


@contextmanager
def last_block_kind(engine, kind):
    """Make the last vision block windowed (the tiny default) or full attention (as in the real model)."""
    visual = engine.model.model.visual
    saved = list(visual.fullatt_block_indexes)
    last = len(visual.blocks) - 1
    visual.fullatt_block_indexes = [i for i in saved if i != last] + ([last] if kind == "full" else [])
    try:
        yield
    finally:
        visual.fullatt_block_indexes = saved


def stock_inputs(engine, slices, question=QUESTION):
    """What the stock Qwen2.5-VL processor gives the model (its placeholder rule, its pixels); the
    processor itself needs a torchvision video processor, so its text rule is called on a stand-in."""
    tokenizer, image_processor = engine.tokenizer, engine.image_processor
    image_inputs = image_processor(images=list(slices), return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}] * len(slices) + [{"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    shim = SimpleNamespace(image_processor=image_processor, image_token="<|image_pad|>")
    head, *tails = text.split("<|image_pad|>")
    text = head + "".join(
        Qwen2_5_VLProcessor.replace_image_token(shim, image_inputs, i) + tail for i, tail in enumerate(tails)
    )
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": image_inputs["pixel_values"],
        "image_grid_thw": image_inputs["image_grid_thw"],
        "mm_token_type_ids": (input_ids == engine.model.config.image_token_id).int(),
    }


def test_adapter_facts(engine):
    adapter = engine.adapter
    assert adapter.family == "qwen2_5_vl" and adapter.renumber_positions is False
    assert adapter.token_pixels == 28 and adapter.preferred_slice_size == SIZE
    visual = engine.model.model.visual
    assert len(visual.blocks) - 1 not in visual.fullatt_block_indexes, "the tiny model's last block is windowed"


def test_prompt_ids_are_the_stock_processors(engine, slices):
    inputs = stock_inputs(engine, slices)
    ours = engine.adapter.prompt_ids(len(slices), TOKENS, QUESTION)
    assert torch.equal(ours, inputs["input_ids"])
    assert engine.tokenizer.decode(ours[0]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert int((ours == engine.model.config.image_token_id).sum()) == len(slices) * TOKENS


@pytest.mark.parametrize("kind", ["window", "full"])
def test_pruning_off_gives_the_stock_prefill_logits_and_greedy_tokens(engine, slices, kind):
    inputs = stock_inputs(engine, slices)
    with last_block_kind(engine, kind), torch.inference_mode():
        stock = engine.model(**inputs).logits[0]
        out = engine.model.generate(**inputs, max_new_tokens=12, do_sample=False)
        ours = engine.prefill_logits(slices, QUESTION, PruningConfig(enabled=False))
        result = engine.ask(slices, QUESTION, PruningConfig(enabled=False), max_new_tokens=12)
    assert ours.shape == stock.shape
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    stock_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert result.token_ids == stock_ids
    assert len(set(stock_ids)) > 1, "a degenerate model would make this comparison weak"
    assert result.counts["visual_tokens_kept"] == result.counts["visual_tokens_total"] == 8 * TOKENS


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _explicit_last_block(engine, pixel_values, grid_thw):
    """Stock features, and the last block's attention recomputed in the ORIGINAL patch order.

    The block's input and rotary embedding are captured (they are in window order), put back into the
    original order with the inverse of the stock window_index, and attention is computed there with
    an explicit mask: within one image for a full block, within one attention window for a windowed
    one (windows rebuilt from the stock cu_window_seqlens, mapped to original patches).
    Returns (features, per-patch received attention (K, P), per-patch head-mean keys (K, P, d)).
    """
    model = engine.model
    visual = model.model.visual
    block = visual.blocks[-1]
    captured = {}
    hook = block.register_forward_pre_hook(lambda m, args, kwargs: captured.update(x=args[0], **kwargs),
                                           with_kwargs=True)
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values, grid_thw, return_dict=True).pooler_output
    hook.remove()
    window_index, cu_window = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                      visual.patch_size)
    unit = visual.spatial_merge_size**2
    # Window-order row r holds original patch original[r].
    original = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)
    count = grid_thw.shape[0]
    image_of = torch.arange(count).repeat_interleave(PATCHES)                       # original order
    window_of_row = torch.bucketize(torch.arange(len(original)), cu_window[1:].long(), right=True)
    window_of = torch.empty_like(window_of_row)
    window_of[original] = window_of_row
    windowed = (len(visual.blocks) - 1) not in visual.fullatt_block_indexes
    group = window_of if windowed else image_of
    allowed = group[:, None] == group[None, :]
    with torch.inference_mode():
        x = torch.empty_like(captured["x"])
        x[original] = captured["x"]
        cos, sin = captured["position_embeddings"]
        cos_o, sin_o = torch.empty_like(cos), torch.empty_like(sin)
        cos_o[original], sin_o[original] = cos, sin
        qkv = block.attn.qkv(block.norm1(x))
        heads = block.attn.num_heads
        q, k, _ = qkv.reshape(qkv.shape[0], 3, heads, -1).permute(1, 0, 2, 3)
        cos_o, sin_o = cos_o.unsqueeze(-2), sin_o.unsqueeze(-2)
        q, k = q * cos_o + _rotate_half(q) * sin_o, k * cos_o + _rotate_half(k) * sin_o
        logits = torch.einsum("qhd,khd->hqk", q, k) * block.attn.scaling
        attention = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    received = attention.mean(0).sum(0).reshape(count, PATCHES)
    keys = k.mean(1).reshape(count, PATCHES, -1)
    return features, received, keys, original


@pytest.mark.parametrize("kind", ["window", "full"])
def test_captured_attention_is_in_original_patch_order(engine, slices, kind):
    adapter = engine.adapter
    pixels = adapter.preprocess(list(slices[:3]))
    grid = pixels.extras["grid_thw"]
    with last_block_kind(engine, kind):
        with torch.inference_mode():
            features = adapter.encode(pixels)
        _, received, keys, original = _explicit_last_block(engine, pixels.pixel_values, grid)
    assert not torch.equal(original, torch.arange(len(original))), "the windows must really reorder patches"
    token_scores = received.reshape(3, TOKENS, 4).mean(-1)
    token_keys = keys.reshape(3, TOKENS, 4, -1).mean(2)
    torch.testing.assert_close(features.scores, token_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.keys, token_keys, atol=1e-5, rtol=1e-5)
    # The same attention left in window order would give other token scores: the test can tell.
    in_window_order = received.reshape(-1)[original].reshape(3, TOKENS, 4).mean(-1)
    assert not torch.allclose(in_window_order, token_scores, atol=1e-4)
    # Every query's softmax row sums to 1: a slice's patch scores add up to its number of patches.
    for scores in features.scores:
        assert float(scores.sum()) * 4 == pytest.approx(PATCHES, rel=1e-4)


@pytest.mark.parametrize("kind", ["window", "full"])
def test_pruned_answer_equals_an_explicit_computation(engine, slices, kind):
    config = PruningConfig(gamma=0.05, tau=0.6, temperature=2.0, contextual_ratio=0.1)
    model = engine.model
    inputs = stock_inputs(engine, slices)
    count = len(slices)
    pixels = inputs["pixel_values"].reshape(count, -1, inputs["pixel_values"].shape[-1])
    with last_block_kind(engine, kind):
        result = engine.ask(slices, QUESTION, config, max_new_tokens=10)
        pruned_logits = engine.prefill_logits(slices, QUESTION, config)
        kept_slices = explicit_slice_filter(pixels, config.gamma)
        features, received, keys, _ = _explicit_last_block(
            engine, pixels[kept_slices].reshape(-1, pixels.shape[-1]), inputs["image_grid_thw"][kept_slices]
        )
    assert np.flatnonzero(result.slice_kept).tolist() == kept_slices
    assert len(kept_slices) < count, "the input must make the slice filter drop something"

    visual_embeds = []
    for j, s in enumerate(kept_slices):
        roles, merged, _ = explicit_selection(
            received[j].reshape(TOKENS, 4).mean(-1).tolist(), keys[j].reshape(TOKENS, 4, -1).mean(1), features[j],
            config.tau, config.temperature, config.contextual_ratio,
        )
        np.testing.assert_array_equal(result.token_role[s].ravel(), roles)
        visual_embeds.append(merged)
    assert result.counts["visual_tokens_kept"] < len(kept_slices) * TOKENS, "tau < 1 must prune tokens"

    # The stock language model on the filtered embeddings at the filtered ORIGINAL M-RoPE positions.
    ids = inputs["input_ids"]
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])
    keep = keep_mask(ids, model.config.image_token_id, result.token_role, TOKENS)
    ids_kept, pos_kept = ids[:, keep], positions[:, :, keep]
    embed = model.model.get_input_embeddings()
    with torch.inference_mode():
        embeds = embed(ids_kept)
        embeds[ids_kept == model.config.image_token_id] = torch.cat(visual_embeds)
        next_position = int(positions.max()) + 1
        generated = []
        for step in range(10):   # no cache: the whole sequence again at every step
            out = model.model.language_model(inputs_embeds=embeds, position_ids=pos_kept, use_cache=False)
            if step == 0:
                prefill_logits = model.lm_head(out.last_hidden_state)[0]
            token = int(model.lm_head(out.last_hidden_state[:, -1]).argmax())
            generated.append(token)
            if token in engine.adapter.eos_token_ids():
                break
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
            pos_kept = torch.cat([pos_kept, torch.full((3, 1, 1), next_position + step)], dim=2)
    assert result.token_ids == generated
    torch.testing.assert_close(pruned_logits, prefill_logits, atol=1e-5, rtol=0)
    assert result.counts["prompt_tokens_pruned"] == int(keep.sum())
    assert result.counts["prompt_tokens_full"] == ids.shape[1]
