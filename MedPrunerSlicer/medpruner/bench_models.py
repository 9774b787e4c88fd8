"""Real-size models with random weights, from the published architecture sizes, for `medpruner bench`.

Speed depends on the architecture, not on the weights, so a model built from the published sizes
(hidden size, layers, heads, vision depth, patch and merge sizes) gives real-size timings without
any download. The numbers below are the ones in the public config.json of each checkpoint.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # torch loads only when an engine is built: `medpruner --help` stays fast
    import torch

# Qwen3-VL-2B-Instruct and Qwen3-VL-8B-Instruct, config.json (text_config / vision_config).
QWEN3_VL_SIZES: dict[str, dict[str, Any]] = {
    "qwen3-vl-2b": {
        "text": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=5_000_000.0),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                       num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
        "tie_word_embeddings": True,
    },
    "qwen3-vl-8b": {
        "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=5_000_000.0),
        "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        "tie_word_embeddings": False,
    },
}

# MedGemma 4B (google/medgemma-4b-it, the Gemma 3 4B architecture), config.json.
MEDGEMMA_4B_SIZES: dict[str, Any] = {
    "text": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                 vocab_size=262208),
    "sliding_pattern": 6,   # five sliding-window layers, then one global layer
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   patch_size=14, image_size=896),
    "mm_tokens_per_image": 256,
}

BENCH_CONFIGS = ("tiny", *QWEN3_VL_SIZES, "medgemma-4b")


def _medgemma_engine(device: torch.device, dtype: torch.dtype):
    import torch

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from .adapters.gemma3 import Gemma3Adapter
    from .engine import MedPruner
    from .tiny import GEMMA_CHAT_TEMPLATE, GEMMA_SPECIAL_TOKENS, _gemma3_image_processor, _gemma_tokenizer

    sizes = MEDGEMMA_4B_SIZES
    tokenizer = _gemma_tokenizer(vocab_size=600)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in GEMMA_SPECIAL_TOKENS}
    layers = sizes["text"]["num_hidden_layers"]
    pattern = sizes["sliding_pattern"]
    config = Gemma3Config(
        text_config=dict(
            sizes["text"], max_position_embeddings=131072, pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
            layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)],
        ),
        vision_config=dict(sizes["vision"], model_type="siglip_vision_model", vision_use_head=False),
        mm_tokens_per_image=sizes["mm_tokens_per_image"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    image_processor = _gemma3_image_processor(sizes["vision"]["image_size"])
    return MedPruner(Gemma3Adapter(model, tokenizer, image_processor), model_id="config:medgemma-4b (random weights)")


def _qwen3_vl_engine(name: str, device: torch.device, dtype: torch.dtype):
    import torch

    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from .adapters import Qwen3VLAdapter
    from .engine import MedPruner
    from .tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, _qwen_image_processor, _train_tokenizer

    sizes = QWEN3_VL_SIZES[name]
    tokenizer = _train_tokenizer(vocab_size=600)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    text = dict(sizes["text"])
    rope_theta = text.pop("rope_theta")
    config = Qwen3VLConfig(
        text_config=dict(text, max_position_embeddings=262144,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(sizes["vision"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=sizes["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = _qwen_image_processor(448)
    return MedPruner(Qwen3VLAdapter(model, tokenizer, image_processor), model_id=f"config:{name} (random weights)")


def build_bench_engine(name: str, device: str | torch.device | None = "auto", dtype: str | None = None):
    """An engine for `name` in BENCH_CONFIGS: the tiny checkpoint, or a real-size random-weight model."""
    import torch

    from .engine import MedPruner, _resolve_device, _resolve_dtype
    from .errors import InputError

    if name not in BENCH_CONFIGS:
        raise InputError(f"Unknown benchmark config {name!r}.", f"Use one of: {', '.join(BENCH_CONFIGS)}.")
    if name == "tiny":
        from .tiny import ensure_tiny_checkpoint

        return MedPruner.from_pretrained(ensure_tiny_checkpoint("qwen3_vl"), device=device, dtype=dtype or "float32")
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    if name == "medgemma-4b":
        return _medgemma_engine(torch_device, torch_dtype)
    return _qwen3_vl_engine(name, torch_device, torch_dtype)
