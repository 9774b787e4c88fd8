"""The prompt of one question about S slices, built exactly as the stock processor would build it.

Qwen-VL processors need torchvision (for their video half), which cannot be installed beside a CPU
torch here, so we do their text work ourselves: render the checkpoint's own chat template for one
user turn of S images then the question, tokenize it with the checkpoint's tokenizer, and expand
every image placeholder id into as many placeholder ids as the image has LLM tokens.
"""
from __future__ import annotations


import torch


def user_turn(num_images: int, question: str) -> list[dict]:
    """One user message: the images in order, then the question (the layout MedPruner uses)."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def render_prompt(tokenizer, num_images: int, question: str) -> str:
    """The chat-template text with one placeholder per image, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(user_turn(num_images, question), add_generation_prompt=True, tokenize=False)


def expand_placeholder_ids(ids: torch.Tensor, placeholder_id: int, tokens_per_image: int, num_images: int) -> torch.Tensor:
    """Repeat each image placeholder id `tokens_per_image` times in (1, L) ids.

    The same ids the stock processor gets by repeating the placeholder in the text before
    tokenizing (a special token is matched whole, so the text around it tokenizes the same), without
    tokenizing thousands of placeholders.
    """
    row = ids[0]
    is_placeholder = row == placeholder_id
    found = int(is_placeholder.sum())
    if found != num_images:
        raise ValueError(
            f"The chat template produced {found} image placeholders for {num_images} slices; "
            "the checkpoint's chat template does not render one image per slice."
        )
    repeats = torch.where(is_placeholder, tokens_per_image, 1)
    return row.repeat_interleave(repeats)[None]


def tokenize_prompt(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1, L) of an already-rendered prompt (the template already holds its special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.to(torch.long)
