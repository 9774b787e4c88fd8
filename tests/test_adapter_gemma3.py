"""Gemma 3 / MedGemma adapter against the stock model and processor: exact with pruning off, equal to an
explicit computation with it on, pooling windows that are the projector's, bidirectional image blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma3Processor

from medpruner import MedPruner, PruningConfig
from medpruner.pruning import nucleus
from medpruner.tiny import build_tiny_checkpoint
from test_adapters_common import QUESTION, explicit_selection, explicit_slice_filter, keep_mask, make_slices

SIZE = 128          # the tiny model's fixed image size
SIDE = 4            # LLM tokens per side (16 per image)
KERNEL = 4          # patches per token side: 16x16 patches -> 4x4 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gemma3", family="gemma3")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return MedPruner.from_pretrained(checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def slices():
    return make_slices(SIZE)


def processor(engine):
    """The stock Gemma3Processor (constructible without torchvision with the PIL image processor)."""
    return Gemma3Processor(
        image_processor=engine.image_processor,
        tokenizer=engine.tokenizer,
        chat_template=engine.tokenizer.chat_template,
        image_seq_length=engine.model.config.mm_tokens_per_image,
    )


def stock_inputs(engine, slices, question=QUESTION):
    messages = [{"role": "user", "content": [{"type": "image", "image": s} for s in slices]
                 + [{"type": "text", "text": question}]}]
    out = processor(engine).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}


def test_adapter_facts(engine):
    adapter = engine.adapter
    assert adapter.family == "gemma3" and adapter.renumber_positions is True
    assert adapter.preferred_slice_size == SIZE == engine.image_processor.size["height"]
    assert adapter.token_pixels == SIZE // SIDE
    assert engine.model.model.multi_modal_projector.kernel_size == KERNEL


def test_prompt_and_pixels_are_the_stock_processors(engine, slices):
    inputs = stock_inputs(engine, slices)
    ours = engine.adapter.prompt_ids(len(slices), SIDE * SIDE, QUESTION)
    assert torch.equal(ours, inputs["input_ids"])
    tokenizer = engine.tokenizer
    text = tokenizer.decode(ours[0])
    assert text.startswith("<bos><start_of_turn>user\n") and text.count("<bos>") == 1
    assert text.count("\n\n<start_of_image>" + "<image_soft_token>" * 16 + "<end_of_image>\n\n") == len(slices)
    assert torch.equal(engine.adapter.image_token_mask(ours).long(), inputs["token_type_ids"][0])
    pixels = engine.adapter.preprocess(list(slices))
    assert torch.equal(pixels.pixel_values, inputs["pixel_values"])


def test_pruning_off_gives_the_stock_prefill_logits(engine, slices):
    inputs = stock_inputs(engine, slices)
    with torch.inference_mode():
        stock = engine.model(**inputs).logits[0]
    ours = engine.prefill_logits(slices, QUESTION, PruningConfig(enabled=False))
    assert ours.shape == stock.shape
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


def test_pruning_off_gives_the_stock_greedy_tokens(engine, slices):
    inputs = stock_inputs(engine, slices)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    stock_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    result = engine.ask(slices, QUESTION, PruningConfig(enabled=False), max_new_tokens=12)
    assert result.token_ids == stock_ids
    assert len(set(stock_ids)) > 1, "a degenerate model would make this comparison weak"
    assert result.counts["visual_tokens_kept"] == result.counts["visual_tokens_total"] == 8 * 16
    assert inputs["input_ids"].shape[1] > engine.model.config.text_config.sliding_window, \
        "the prompt must be longer than the sliding window, so the sliding layers really slide"


def _window_pool(values: torch.Tensor) -> torch.Tensor:
    """(P,) or (P, d) per patch in raster order -> per-token means over each token's KERNEL x KERNEL window."""
    grid = values.reshape(SIDE, KERNEL, SIDE, KERNEL, *values.shape[1:])
    return grid.mean(dim=(1, 3)).reshape(SIDE * SIDE, *values.shape[1:])


def _raster_pool(values: torch.Tensor) -> torch.Tensor:
    """The published code's grouping: 16 CONSECUTIVE patches in raster order per token."""
    return values.reshape(SIDE * SIDE, KERNEL * KERNEL, *values.shape[1:]).mean(dim=1)


def _explicit_patch_attention(engine, pixel_values):
    """Stock vision features, and the last SigLIP block's q/k recomputed from its captured input."""
    model = engine.model
    layer = model.model.vision_tower.encoder.layers[-1]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values).pooler_output
    hook.remove()
    attn = layer.self_attn
    with torch.inference_mode():
        x = layer.layer_norm1(captured["x"])
        heads = attn.num_heads
        q = attn.q_proj(x).reshape(x.shape[0], x.shape[1], heads, -1)
        k = attn.k_proj(x).reshape(x.shape[0], x.shape[1], heads, -1)
        attention = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.head_dim**-0.5, dim=-1)
    patch_scores = attention.mean(1).sum(1)        # (K, P): attention each patch receives
    patch_keys = k.mean(2)                         # (K, P, d)
    return features, patch_scores, patch_keys


def _roles(scores, keys, embeds, config):
    return explicit_selection(scores.tolist(), keys, embeds, config.tau, config.temperature, config.contextual_ratio)


@pytest.mark.parametrize("renumber", [None, False])
def test_pruned_answer_equals_an_explicit_computation(checkpoint, engine, slices, renumber):
    """Default (renumbered 0..L'-1, the published Gemma 3 behaviour) and original positions."""
    if renumber is not None:
        engine = MedPruner.from_pretrained(checkpoint, dtype="float32", renumber_positions=renumber)
    config = PruningConfig(gamma=0.05, tau=0.6, temperature=2.0, contextual_ratio=0.1)
    result = engine.ask(slices, QUESTION, config, max_new_tokens=10)
    model = engine.model
    inputs = stock_inputs(engine, slices)
    pixels = inputs["pixel_values"]
    count = len(slices)

    kept_slices = explicit_slice_filter(pixels, config.gamma)
    assert np.flatnonzero(result.slice_kept).tolist() == kept_slices
    assert len(kept_slices) < count, "the input must make the slice filter drop something"

    features, patch_scores, patch_keys = _explicit_patch_attention(engine, pixels[kept_slices])
    visual_embeds, raster_differs = [], False
    for j, s in enumerate(kept_slices):
        roles, merged, _ = _roles(_window_pool(patch_scores[j]), _window_pool(patch_keys[j]), features[j], config)
        np.testing.assert_array_equal(result.token_role[s].ravel(), roles)
        raster_roles, _, _ = _roles(_raster_pool(patch_scores[j]), _raster_pool(patch_keys[j]), features[j], config)
        raster_differs |= not np.array_equal(raster_roles, roles)
        visual_embeds.append(merged)
    assert raster_differs, "the published raster grouping must give other decisions on this input"
    assert result.counts["visual_tokens_kept"] < len(kept_slices) * 16, "tau < 1 must prune tokens"

    # The stock model on the filtered sequence: token types of the filtered sequence (bidirectional
    # blocks over each image's kept tokens), positions per the option, no cache.
    ids = inputs["input_ids"]
    keep = keep_mask(ids, model.config.image_token_id, result.token_role, 16)
    ids_kept = ids[:, keep]
    renumbered = renumber is None
    positions = torch.arange(ids.shape[1])[None]
    pos_kept = torch.arange(ids_kept.shape[1])[None] if renumbered else positions[:, keep]
    next_position = ids_kept.shape[1] if renumbered else ids.shape[1]
    embed = model.model.get_input_embeddings()
    with torch.inference_mode():
        image_mask = ids_kept == model.config.image_token_id
        embeds = embed(ids_kept)
        embeds[image_mask] = torch.cat(visual_embeds)
        token_types = image_mask.long()
        generated = []
        for step in range(10):
            # A 2D mask of ones, as generate passes: without it, gaps in the original positions would be
            # read as several packed sequences by the stock mask code.
            out = model(inputs_embeds=embeds, token_type_ids=token_types, position_ids=pos_kept,
                        attention_mask=torch.ones_like(token_types), use_cache=False)
            if step == 0:
                prefill_logits = out.logits[0]
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            if token in engine.adapter.eos_token_ids():
                break
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
            token_types = torch.cat([token_types, torch.zeros(1, 1, dtype=torch.long)], dim=1)
            pos_kept = torch.cat([pos_kept, torch.tensor([[next_position + step]])], dim=1)
    assert result.token_ids == generated
    torch.testing.assert_close(engine.prefill_logits(slices, QUESTION, config), prefill_logits, atol=1e-5, rtol=0)
    assert result.counts["prompt_tokens_pruned"] == int(keep.sum())
    assert result.counts["prompt_tokens_full"] == ids.shape[1]


def test_token_scores_are_the_projector_pool_of_patch_scores(engine, slices):
    adapter = engine.adapter
    pixels = adapter.preprocess(list(slices[:3]))
    with torch.inference_mode():
        features = adapter.encode(pixels)
        _, patch_scores, patch_keys = _explicit_patch_attention(engine, pixels.pixel_values)
    for j in range(3):
        torch.testing.assert_close(features.scores[j], _window_pool(patch_scores[j]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features.keys[j], _window_pool(patch_keys[j]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(features.scores[j], _raster_pool(patch_scores[j]), atol=1e-4)
    # Each patch's scores are a sum over queries of softmax rows: they add up to the number of patches.
    assert float(features.scores.sum(1).mean()) * KERNEL * KERNEL == pytest.approx(256, rel=1e-4)


def test_pooling_window_is_the_tokens_own_square_not_a_raster_strip(engine):
    """One hot 4x4 window of patches: the token that window becomes must be the one that wins."""
    adapter = engine.adapter
    side = SIDE * KERNEL
    for row, col in [(0, 1), (2, 3), (3, 0)]:
        patches = torch.zeros(side, side)
        patches[row * KERNEL:(row + 1) * KERNEL, col * KERNEL:(col + 1) * KERNEL] = 1.0
        flat = patches.reshape(1, -1)
        ours = adapter.pool_to_tokens(flat)[0]
        assert int(ours.argmax()) == row * SIDE + col and float(ours.max()) == 1.0
        assert int((ours > 0).sum()) == 1
        raster = _raster_pool(flat[0])
        assert int((raster > 0).sum()) == KERNEL, "the raster grouping smears the window over 4 tokens"
        assert float(raster.max()) == pytest.approx(0.25)
        # The nucleus of each: ours keeps exactly the token made from the hot window; the raster
        # grouping keeps 4 tokens, none of them that one unless it happens to lie in the strip.
        _, ours_kept = nucleus(ours[None], tau=0.9, temperature=0.05)
        _, raster_kept = nucleus(raster[None], tau=0.9, temperature=0.05)
        assert torch.nonzero(ours_kept[0]).flatten().tolist() == [row * SIDE + col]
        assert int(raster_kept.sum()) == KERNEL and not torch.equal(ours_kept, raster_kept)


def test_kept_image_tokens_of_one_image_attend_to_each_other_and_no_further(engine, slices):
    """After pruning, an image's EARLIER kept token sees its LATER kept tokens (bidirectional block), but
    never a later image, and text before the images sees nothing after it."""
    config = PruningConfig(tau=0.6, contextual_ratio=0.1)
    prepared = engine.prepare(slices, config, cache_prefix=False)
    ids, positions, _, _, keep = engine._full_prompt(prepared, QUESTION)
    ids_kept, pos_kept = ids[:, keep], positions[:, keep]
    image_rows = torch.nonzero(ids_kept[0] == engine.adapter.image_token_id).flatten()
    kept_per_slice = [int((r > 0).sum()) for r in prepared.token_role if r is not None]
    assert kept_per_slice[0] >= 2 and len(kept_per_slice) >= 2
    first, second_of_first = int(image_rows[0]), int(image_rows[1])
    first_of_second = int(image_rows[kept_per_slice[0]])
    assert first_of_second > second_of_first + 1, "images are separated by <end_of_image> ... <start_of_image>"

    def hidden_with(row_delta):
        embeds = prepared.visual_embeds.clone()
        if row_delta is not None:
            embeds[row_delta] += 1.0
        logits, _ = engine.adapter.prefill(ids_kept, embeds, {}, pos_kept, all_logits=True)
        return logits

    base = hidden_with(None)
    later_same_image = hidden_with(1)                     # second kept token of the first image
    assert not torch.allclose(base[first], later_same_image[first]), "no bidirectional attention inside the image"
    torch.testing.assert_close(base[:first], later_same_image[:first], atol=1e-6, rtol=0)
    next_image = hidden_with(kept_per_slice[0])           # first kept token of the second image
    torch.testing.assert_close(base[:first_of_second], next_image[:first_of_second], atol=1e-6, rtol=0)
