"""Tiny checkpoints of the REAL transformers classes, built locally, for tests and the demo.

No model hub is reachable on CI machines, so we build a small config of the real architecture,
initialise it with seeded random weights, train a small byte-level BPE tokenizer with the special
tokens the chat template needs, and save everything in the layout of a real checkpoint
(config.json, model.safetensors, tokenizer files, preprocessor_config.json naming the fast image
processor, chat_template.jinja, generation_config.json). The engine then loads it through the very
same `from_pretrained` path a user's checkpoint takes. Answers of such a model are meaningless.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Special tokens of the Qwen-VL chat format, in the order their ids are assigned.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A ChatML-style template producing the same prompt layout as Qwen-VL checkpoints for a user turn
# made of images and text: <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>...text<|im_end|>\n
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Text the tiny tokenizer is trained on: radiology words, so questions tokenize into few pieces.
_CORPUS = [
    "Is there a liver lesion? Where is it? How big is it? Is the spleen normal?",
    "Describe the findings in this CT scan of the abdomen and chest.",
    "The lungs are clear. No pleural effusion. The heart size is normal.",
    "A hypodense lesion in the right hepatic lobe, measuring 2 cm, likely a cyst.",
    "Kidneys, pancreas, adrenal glands, bowel, bladder and aorta are unremarkable.",
    "Axial coronal sagittal slice volume MRI CT contrast enhancement density mass nodule.",
    "yes no left right anterior posterior superior inferior normal abnormal tumor fracture",
    "What abnormality is seen? Which organ is affected? Answer with one word.",
]

TINY_FAMILIES = ("qwen3_vl",)


def _train_tokenizer(vocab_size: int):
    """A deterministic byte-level BPE tokenizer with the chat-format special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )


def _qwen3_vl_model(tokenizer, seed: int):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True},
            # Larger than the real 0.02 so random attention is peaked and answers vary with input.
            initializer_range=0.3,
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
            initializer_range=0.3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Zero logits for the special tokens, so random weights write words instead of stopping at once.
        model.lm_head.weight[[ids[tok] for tok in QWEN_SPECIAL_TOKENS]] = 0.0
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    return model


def _qwen_image_processor(slice_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 32 * 32, "longest_edge": slice_pixels * slice_pixels},
    )


def build_tiny_checkpoint(path: str | os.PathLike, family: str = "qwen3_vl", seed: int = 0,
                          slice_pixels: int = 224) -> Path:
    """Build and save a tiny checkpoint of `family` at `path` (replaced atomically); return the path.

    `slice_pixels` is the largest square slice the checkpoint's image processor accepts unchanged;
    it becomes the adapter's preferred slice size.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"No tiny checkpoint for family {family!r}; available: {', '.join(TINY_FAMILIES)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        tokenizer = _train_tokenizer(vocab_size=600)
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        model = _qwen3_vl_model(tokenizer, seed)
        image_processor = _qwen_image_processor(slice_pixels)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        # Real Qwen-VL checkpoints name the fast (torchvision) processor; the engine must cope.
        pp = staging / "preprocessor_config.json"
        cfg = json.loads(pp.read_text())
        cfg["image_processor_type"] = "Qwen2VLImageProcessorFast"
        pp.write_text(json.dumps(cfg, indent=2))
        (staging / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
        (staging / "MEDPRUNER_TINY.txt").write_text(
            "Tiny random-weight model built by medpruner.tiny for tests and the demo. "
            "Its answers are meaningless.\n"
        )
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def default_cache_dir() -> Path:
    """Where the demo keeps its tiny model: $MEDPRUNER_CACHE or ~/.cache/medpruner."""
    root = os.environ.get("MEDPRUNER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medpruner")
    return Path(root)


def ensure_tiny_checkpoint(family: str = "qwen3_vl", cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached tiny checkpoint of `family`, building it once if it is missing."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"tiny-{family}"
    if not (path / "config.json").exists() or not (path / "MEDPRUNER_TINY.txt").exists():
        build_tiny_checkpoint(path, family=family)
    return path
