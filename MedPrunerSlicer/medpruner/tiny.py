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

TINY_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "gemma3")
# The model name the CLI and server take for the tiny demo checkpoint (random weights).
TINY_MODEL = "tiny"

# Qwen2.5-VL instruct checkpoints open every conversation with a default system turn.
QWEN2_5_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
) + QWEN_CHAT_TEMPLATE

# Special tokens of the Gemma 3 chat format, in the order their ids are assigned.
GEMMA_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# The Gemma 3 turn layout: <bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n, an image
# rendered as <start_of_image> (the processor expands it), text trimmed, "assistant" called "model".
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] | trim -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{- '<start_of_image>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] | trim -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- endif -%}"
)

# Default largest square slice of each tiny family (the adapter's preferred slice size).
_DEFAULT_SLICE_PIXELS = {"qwen3_vl": 224, "qwen2_5_vl": 168, "gemma3": 128}


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


def _gemma_tokenizer(vocab_size: int):
    """A deterministic byte-level BPE tokenizer with the Gemma 3 special tokens; like the real one it
    adds <bos> when asked for special tokens, and names its image tokens (boi/eoi/image_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(GEMMA_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS + ["\n\n" + line + "\n\n\n" for line in _CORPUS], trainer=trainer)
    bos_id = core.token_to_id("<bos>")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        model_max_length=32768,
    )


def _gemma3_model(tokenizer, seed: int, image_size: int):
    """A tiny Gemma3ForConditionalGeneration: SigLIP on image_size px with 16x16 patches, 4x4 pool to 16
    tokens (kernel 4 as in the real 896 px / 14 px / 256-token model), sliding + global text layers."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in GEMMA_SPECIAL_TOKENS}
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            # Shorter than a tiny prompt, so the sliding-window layer really slides (1024 in MedGemma).
            sliding_window=48,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=8192,
            initializer_range=0.3,
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=image_size // 16,
            vision_use_head=False,
        ),
        mm_tokens_per_image=16,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # The stock init zeroes the image projection (then every image token is the same); randomise it.
        projector = model.model.multi_modal_projector
        projector.mm_input_projection_weight.normal_(0.0, 0.3)
        # Peaked random attention in the last SigLIP block, so token scores differ between slices.
        last = model.model.vision_tower.encoder.layers[-1].self_attn
        for proj in (last.q_proj, last.k_proj):
            proj.weight.normal_(0.0, 0.3)
        model.lm_head.weight[[ids[tok] for tok in GEMMA_SPECIAL_TOKENS]] = 0.0
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.bos_token_id = ids["<bos>"]
    model.generation_config.do_sample = False
    return model


def _gemma3_image_processor(image_size: int):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )


def _qwen2_5_vl_model(tokenizer, seed: int):
    """A tiny Qwen2_5_VLForConditionalGeneration: 14 px patches, 2x2 merge, 112 px attention windows and
    its LAST vision block windowed (block 0 attends globally), so the window reordering matters."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            initializer_range=0.3,
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
            out_hidden_size=64,
            initializer_range=0.3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _finish_qwen_model(Qwen2_5_VLForConditionalGeneration(config).eval(), ids)


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
    return _finish_qwen_model(Qwen3VLForConditionalGeneration(config).eval(), ids)


def _finish_qwen_model(model, ids: dict[str, int]):
    """Generation settings of a tiny Qwen-VL model, and zero logits for the special tokens, so random
    weights write words instead of stopping at once."""
    import torch

    with torch.no_grad():
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


def _qwen2_5_image_processor(slice_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        size={"shortest_edge": 56 * 56, "longest_edge": slice_pixels * slice_pixels},
    )


def _build_family(family: str, seed: int, slice_pixels: int):
    """(model, tokenizer, image processor, chat template, processor type named in preprocessor_config)."""
    if family == "gemma3":
        if slice_pixels % 16:
            raise ValueError(f"A tiny gemma3 needs slice_pixels divisible by 16 (16x16 patches), got {slice_pixels}.")
        tokenizer = _gemma_tokenizer(vocab_size=600)
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        return (_gemma3_model(tokenizer, seed, slice_pixels), tokenizer, _gemma3_image_processor(slice_pixels),
                GEMMA_CHAT_TEMPLATE, "Gemma3ImageProcessor")
    if family == "qwen2_5_vl":
        tokenizer = _train_tokenizer(vocab_size=600)
        tokenizer.chat_template = QWEN2_5_CHAT_TEMPLATE
        return (_qwen2_5_vl_model(tokenizer, seed), tokenizer, _qwen2_5_image_processor(slice_pixels),
                QWEN2_5_CHAT_TEMPLATE, "Qwen2VLImageProcessorFast")
    tokenizer = _train_tokenizer(vocab_size=600)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return (_qwen3_vl_model(tokenizer, seed), tokenizer, _qwen_image_processor(slice_pixels),
            QWEN_CHAT_TEMPLATE, "Qwen2VLImageProcessorFast")


def build_tiny_checkpoint(path: str | os.PathLike, family: str = "qwen3_vl", seed: int = 0,
                          slice_pixels: int | None = None) -> Path:
    """Build and save a tiny checkpoint of `family` at `path` (replaced atomically); return the path.

    `slice_pixels` is the largest square slice the checkpoint's image processor accepts unchanged
    (for gemma3: the fixed image size); it becomes the adapter's preferred slice size. Default per
    family: qwen3_vl 224, qwen2_5_vl 168, gemma3 128.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"No tiny checkpoint for family {family!r}; available: {', '.join(TINY_FAMILIES)}.")
    if slice_pixels is None:
        slice_pixels = _DEFAULT_SLICE_PIXELS[family]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        model, tokenizer, image_processor, template, processor_type = _build_family(family, seed, slice_pixels)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        # Real checkpoints name the torchvision-backed processor; the engine must cope.
        pp = staging / "preprocessor_config.json"
        cfg = json.loads(pp.read_text())
        cfg["image_processor_type"] = processor_type
        pp.write_text(json.dumps(cfg, indent=2))
        (staging / "chat_template.jinja").write_text(template)
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


def tiny_checkpoint_path(family: str = "qwen3_vl", cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached tiny checkpoint of `family` if it has been built, else None (nothing is built here)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"tiny-{family}"
    return path if (path / "config.json").exists() and (path / "MEDPRUNER_TINY.txt").exists() else None


def ensure_tiny_checkpoint(family: str = "qwen3_vl", cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached tiny checkpoint of `family`, building it once if it is missing."""
    ready = tiny_checkpoint_path(family, cache_dir)
    if ready is not None:
        return ready
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"tiny-{family}"
    build_tiny_checkpoint(path, family=family)
    return path
