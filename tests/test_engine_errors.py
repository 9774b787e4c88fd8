"""Bad configuration and bad input give a clear ValueError and leave the engine fully usable."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medpruner import InputError, MedPruner, ModelLoadError, PruningConfig

QUESTION = "Is there a liver lesion?"


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("gamma", -0.1, ">= 0"),
        ("gamma", float("nan"), ">= 0"),
        ("tau", 0.0, "0 < tau <= 1"),
        ("tau", 1.5, "0 < tau <= 1"),
        ("temperature", 0, "> 0"),
        ("contextual_ratio", 1.0, "0 <= contextual_ratio < 1"),
        ("contextual_ratio", -0.01, "0 <= contextual_ratio < 1"),
        ("merge", "median", "reference, mean"),
        ("enabled", "yes", "True or False"),
        ("tau", "0.5", "0 < tau <= 1"),
    ],
)
def test_config_errors_name_field_value_and_range(field, value, words):
    with pytest.raises(ValueError) as err:
        PruningConfig(**{field: value})
    message = str(err.value)
    assert f"PruningConfig.{field}=" in message and repr(value) in message and words in message


def test_config_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="Unknown PruningConfig field.*gama"):
        PruningConfig.from_dict({"gama": 0.1})
    assert PruningConfig.from_dict({"tau": 0.5}).tau == 0.5


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        PruningConfig().tau = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "slices, words",
    [
        (np.zeros((0, 64, 64, 3), np.uint8), "empty"),
        (np.zeros((2, 64, 64, 3), np.float32), "uint8"),
        (np.zeros((64, 64), np.uint8), "shape"),
        (np.zeros((2, 64, 64, 4), np.uint8), "shape"),
        ([], "No slices"),
        ([np.zeros((64, 64, 3), np.uint8)], "not a PIL image"),
        ([Image.new("RGB", (64, 64)), Image.new("RGB", (96, 64))], "same size"),
        ("slices.nrrd", "numpy array or a list of PIL images"),
    ],
)
def test_bad_slices_are_refused(engine, slices, words):
    with pytest.raises(InputError, match=words):
        engine.ask(slices, QUESTION, max_new_tokens=1)


@pytest.mark.parametrize("question", ["", "   \n", None, "x" * 5000])
def test_bad_questions_are_refused(engine, redundant_slices, question):
    with pytest.raises(InputError):
        engine.ask(redundant_slices, question, max_new_tokens=1)


@pytest.mark.parametrize("max_new_tokens", [0, -1, 1.5, True])
def test_bad_max_new_tokens(engine, redundant_slices, max_new_tokens):
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.ask(redundant_slices, QUESTION, max_new_tokens=max_new_tokens)


def test_engine_works_after_errors_and_accepts_pil_and_grey(engine, redundant_slices):
    with pytest.raises(InputError):
        engine.ask(redundant_slices, "", max_new_tokens=1)
    as_array = engine.ask(redundant_slices, QUESTION, max_new_tokens=4)
    as_pil = engine.ask([Image.fromarray(s) for s in redundant_slices], QUESTION, max_new_tokens=4)
    assert as_array.token_ids == as_pil.token_ids
    grey = engine.ask(redundant_slices[..., 0], QUESTION, max_new_tokens=2)
    assert grey.counts["slices_total"] == len(redundant_slices)
    attn = engine.model.model.visual.blocks[-1].attn
    assert not attn._forward_pre_hooks and not attn.qkv._forward_hooks


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="No checkpoint folder at .* it does not exist") as err:
        MedPruner.from_pretrained(tmp_path / "no-such-model")
    assert "config.json" in err.value.hint
    with pytest.raises(ModelLoadError, match="Cannot load a model config") as err:
        MedPruner.from_pretrained(tmp_path)            # a folder, but no checkpoint in it
    assert err.value.hint


def test_unsupported_family_lists_the_supported_ones(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'llama' model, which MedPruner does not support") as err:
        MedPruner.from_pretrained(tmp_path)
    assert "qwen3_vl" in err.value.hint


def test_unusable_device_and_dtype(tiny_qwen3_vl):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA was requested"):
            MedPruner.from_pretrained(tiny_qwen3_vl, device="cuda")
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        MedPruner.from_pretrained(tiny_qwen3_vl, dtype="float8")


def test_cancel_stops_the_job(engine, redundant_slices):
    from medpruner import Cancelled

    stages = []
    with pytest.raises(Cancelled):
        engine.ask(redundant_slices, QUESTION, progress=lambda stage, f: stages.append(stage),
                   cancel=lambda: "vision" in stages)
    assert "answer" not in stages
    assert engine.ask(redundant_slices, QUESTION, max_new_tokens=2).token_ids
