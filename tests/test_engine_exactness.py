"""The engine against the stock model: exact with pruning off, and equal to an explicit computation with it on."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from medpruner import PruningConfig

QUESTION = "Is there a liver lesion?"


def stock_inputs(engine, slices, question):
    """What the stock Qwen3-VL processor gives the model for this message (its placeholder rule, its pixels)."""
    tokenizer, image_processor = engine.tokenizer, engine.image_processor
    image_inputs = image_processor(images=list(slices), return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}] * len(slices) + [{"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    shim = SimpleNamespace(image_processor=image_processor, image_token="<|image_pad|>")
    head, *tails = text.split("<|image_pad|>")
    text = head + "".join(
        Qwen3VLProcessor.replace_image_token(shim, image_inputs, i) + tail for i, tail in enumerate(tails)
    )
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": image_inputs["pixel_values"],
        "image_grid_thw": image_inputs["image_grid_thw"],
        "mm_token_type_ids": (input_ids == engine.model.config.image_token_id).int(),
    }


def test_prompt_ids_are_the_stock_processors(engine, redundant_slices):
    inputs = stock_inputs(engine, redundant_slices, QUESTION)
    ours = engine.adapter.prompt_ids(len(redundant_slices), 49, QUESTION)
    assert torch.equal(ours, inputs["input_ids"])
    assert int((ours == engine.model.config.image_token_id).sum()) == len(redundant_slices) * 7 * 7


def test_pruning_off_gives_the_stock_prefill_logits(engine, redundant_slices):
    inputs = stock_inputs(engine, redundant_slices, QUESTION)
    with torch.inference_mode():
        stock = engine.model(**inputs).logits[0]
    ours = engine.prefill_logits(redundant_slices, QUESTION, PruningConfig(enabled=False))
    assert ours.shape == stock.shape
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


def test_pruning_off_gives_the_stock_greedy_tokens(engine, redundant_slices):
    inputs = stock_inputs(engine, redundant_slices, QUESTION)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    stock_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    result = engine.ask(redundant_slices, QUESTION, PruningConfig(enabled=False), max_new_tokens=12)
    assert result.token_ids == stock_ids
    assert len(set(stock_ids)) > 1, "a degenerate model would make this comparison weak"
    assert result.counts["visual_tokens_kept"] == result.counts["visual_tokens_total"] == 8 * 49
    assert result.slice_kept.all()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _explicit_selection(scores, keys, embeds, tau, temperature, ratio):
    """Stage 2 written out token by token, independently of medpruner.pruning."""
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


def test_pruned_answer_equals_an_explicit_computation(engine, redundant_slices):
    config = PruningConfig(gamma=0.05, tau=0.6, temperature=2.0, contextual_ratio=0.1)
    result = engine.ask(redundant_slices, QUESTION, config, max_new_tokens=10)
    model = engine.model
    inputs = stock_inputs(engine, redundant_slices, QUESTION)
    count = len(redundant_slices)
    pixels = inputs["pixel_values"].reshape(count, -1, inputs["pixel_values"].shape[-1])

    # Stage 1, explicitly, on the processor's normalised pixels.
    kept_slices, anchor = [0], pixels[0]
    for i in range(1, count):
        if float((pixels[i] - anchor).abs().mean()) > config.gamma:
            kept_slices.append(i)
            anchor = pixels[i]
    assert np.flatnonzero(result.slice_kept).tolist() == kept_slices
    assert len(kept_slices) < count, "the input must make the slice filter drop something"

    # Stock vision features of the kept slices; the last block's input captured to get its q and k.
    captured = {}
    block = model.model.visual.blocks[-1]
    hook = block.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(x=args[0], **kwargs), with_kwargs=True
    )
    with torch.inference_mode():
        features = model.model.get_image_features(
            pixels[kept_slices].reshape(-1, pixels.shape[-1]), inputs["image_grid_thw"][kept_slices], return_dict=True
        )
    hook.remove()
    with torch.inference_mode():
        qkv = block.attn.qkv(block.norm1(captured["x"]))
    heads = block.attn.num_heads
    q, k, _ = qkv.reshape(qkv.shape[0], 3, heads, -1).permute(1, 0, 2, 3)
    cos, sin = (t.unsqueeze(-2) for t in captured["position_embeddings"])
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    per_slice = pixels.shape[1]
    visual_embeds, deepstack = [], [[] for _ in features.deepstack_features]
    for j, s in enumerate(kept_slices):
        qs, ks = q[j * per_slice:(j + 1) * per_slice], k[j * per_slice:(j + 1) * per_slice]
        attention = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) * block.attn.scaling, dim=-1)
        patch_scores = attention.mean(0).sum(0)
        token_scores = patch_scores.reshape(-1, 4).mean(1)
        token_keys = ks.reshape(-1, 4, heads, ks.shape[-1]).mean(1).mean(1)
        roles, merged, kept_tokens = _explicit_selection(
            token_scores.tolist(), token_keys, features.pooler_output[j], config.tau, config.temperature,
            config.contextual_ratio,
        )
        np.testing.assert_array_equal(result.token_role[s].ravel(), roles)
        visual_embeds.append(merged)
        for layer, feats in enumerate(features.deepstack_features):
            deepstack[layer].append(feats[j][kept_tokens])
    assert result.counts["visual_tokens_kept"] < len(kept_slices) * 49, "tau < 1 must prune tokens"

    # The stock language model on the filtered embeddings at the filtered ORIGINAL positions.
    ids = inputs["input_ids"]
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])
    image_positions = torch.nonzero(ids[0] == model.config.image_token_id).flatten().tolist()
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    n_tok = 49
    for s in range(count):
        role = result.token_role[s]
        for t in range(n_tok):
            keep[image_positions[s * n_tok + t]] = bool(role is not None and role.ravel()[t] > 0)
    ids_kept, pos_kept = ids[:, keep], positions[:, :, keep]
    embed = model.model.get_input_embeddings()
    with torch.inference_mode():
        embeds = embed(ids_kept)
        visual_mask = ids_kept == model.config.image_token_id
        embeds[visual_mask] = torch.cat(visual_embeds)
        deepstack_kept = [torch.cat(chunks) for chunks in deepstack]
        next_position = int(positions.max()) + 1
        generated = []
        for step in range(10):   # no cache: the whole sequence again at every step
            out = model.model.language_model(
                inputs_embeds=embeds, position_ids=pos_kept, visual_pos_masks=visual_mask,
                deepstack_visual_embeds=deepstack_kept, use_cache=False,
            )
            if step == 0:   # the whole pruned prefill must match, not just the argmax
                prefill_logits = model.lm_head(out.last_hidden_state)[0]
            token = int(model.lm_head(out.last_hidden_state[:, -1]).argmax())
            generated.append(token)
            if token in engine.adapter.eos_token_ids():
                break
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
            pos_kept = torch.cat([pos_kept, torch.full((3, 1, 1), next_position + step)], dim=2)
            visual_mask = torch.cat([visual_mask, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
    assert result.token_ids == generated
    torch.testing.assert_close(engine.prefill_logits(redundant_slices, QUESTION, config), prefill_logits,
                               atol=1e-5, rtol=0)
    assert result.counts["prompt_tokens_pruned"] == int(keep.sum())
    assert result.counts["prompt_tokens_full"] == ids.shape[1]


def test_dropped_slices_never_reach_the_vision_encoder(engine, redundant_slices):
    seen = []
    hook = engine.model.model.visual.patch_embed.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[0])
    )
    try:
        result = engine.ask(redundant_slices, QUESTION, PruningConfig(), max_new_tokens=2)
    finally:
        hook.remove()
    per_slice = 14 * 14
    assert result.counts["slices_kept"] < len(redundant_slices)
    assert sum(seen) == result.counts["slices_kept"] * per_slice


def test_capture_leaves_the_encoder_output_bit_identical(engine, redundant_slices):
    adapter = engine.adapter
    pixels = adapter.preprocess(list(redundant_slices))
    with torch.inference_mode():
        captured = adapter.encode(pixels)
        plain = engine.model.model.get_image_features(pixels.pixel_values, pixels.extras["grid_thw"], return_dict=True)
    for ours, stock in zip(captured.embeds, plain.pooler_output):
        assert torch.equal(ours, stock)
    attn = engine.model.model.visual.blocks[-1].attn
    assert not attn._forward_pre_hooks and not attn.qkv._forward_hooks, "hooks must be removed after encoding"
    assert len(captured.scores) == len(redundant_slices)
    assert all(s.shape == (49,) for s in captured.scores)
    # Each slice's scores are a sum over queries of softmax rows: they add up to the number of patches.
    for scores in captured.scores:
        assert float(scores.sum()) * 4 == pytest.approx(14 * 14, rel=1e-4)


def test_result_is_json_ready_and_consistent(engine, redundant_slices):
    import json

    result = engine.ask(redundant_slices, QUESTION, PruningConfig(tau=0.7), max_new_tokens=3)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["slice_l1"][0] is None
    assert data["counts"]["slices_total"] == 8
    for kept, role, scores in zip(result.slice_kept, result.token_role, result.token_scores):
        assert (role is None) == (not kept) == (scores is None)
        if kept:
            assert role.shape == scores.shape == (7, 7) and role.dtype == np.uint8
            assert scores.dtype == np.float32 and scores.sum() == pytest.approx(1.0, abs=1e-5)
    kept_tokens = sum(int((r > 0).sum()) for r in result.token_role if r is not None)
    assert kept_tokens == result.counts["visual_tokens_kept"]
    assert set(result.timings) >= {"preprocess", "vision", "pruning", "prefill", "decode", "total"}
    assert result.peak_memory_bytes is None
