"""Pretrained bases as a hospital's folder holds them: tiny configs with random weights, `save_pretrained` to disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

from fedmeki_core.models.injection import word_tokenizer

TOPICS = ["heart", "lung", "fever", "pain", "drug", "dose", "cause", "liver", "kidney", "skin"]
LETTERS = ["a", "b", "c", "d"]
VOCABULARY = [*TOPICS, *LETTERS, "which", "option", "treats", "the", "options", "instruction", "input", "response"]


def instruction_lines(count: int, seed: int) -> list[dict[str, str]]:
    """Multiple-choice flashcards whose answer letter follows from the question (a rule a model can learn)."""
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(count):
        index = int(torch.randint(len(TOPICS), (1,), generator=generator))
        topic, letter = TOPICS[index], LETTERS[index % len(LETTERS)]
        lines.append(
            {
                "instruction": f"which option treats the {topic} ?",
                "input": "options: a b c d",
                "output": letter,
            }
        )
    return lines


def write_instructions(path: Path, count: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in instruction_lines(count, seed)))
    return path


def save_llama(folder: Path, seed: int = 0, hidden: int = 64) -> Path:
    """A Llama-style causal LM (2 layers) and its word-level tokenizer, saved as safetensors."""
    tokenizer = word_tokenizer([*VOCABULARY, "?", "#", ":"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def save_vit(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A small ViT image classifier (a pretrained backbone's layout: config.json + model.safetensors)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    return folder
