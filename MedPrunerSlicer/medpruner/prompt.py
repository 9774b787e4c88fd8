"""The prompt of one question about S slices, built exactly as the stock processor would build it.

Qwen-VL processors need torchvision (for their video half), which cannot be installed beside a CPU
torch here, so we do their text work ourselves: render the checkpoint's own chat template for one
user turn of S images then the question, expand every image placeholder into as many placeholder
tokens as the image has LLM tokens, and tokenize with the checkpoint's tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def user_turn(num_images: int, question: str) -> list[dict]:
    """One user message: the images in order, then the question (the layout MedPruner uses)."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def render_prompt(tokenizer, num_images: int, question: str) -> str:
    """The chat-template text with one placeholder per image, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(user_turn(num_images, question), add_generation_prompt=True, tokenize=False)


def expand_placeholders(text: str, placeholder: str, tokens_per_image: Sequence[int]) -> str:
    """Replace the i-th `placeholder` by `tokens_per_image[i]` copies of it, as the stock processor does."""
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ValueError(
            f"The chat template produced {len(pieces) - 1} image placeholders for {len(tokens_per_image)} slices; "
            "the checkpoint's chat template does not render one image per slice."
        )
    out = [pieces[0]]
    for count, piece in zip(tokens_per_image, pieces[1:]):
        out.append(placeholder * int(count))
        out.append(piece)
    return "".join(out)


def tokenize_prompt(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1, L) of an already-rendered prompt (the template already holds its special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.to(torch.long)
