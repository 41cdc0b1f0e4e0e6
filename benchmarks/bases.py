"""Pretrained-shaped bases with random weights, saved as a hospital's `save_pretrained` folder for the benchmarks.

    python -m benchmarks.bases llama --shape 7b OUT      python -m benchmarks.bases vit --shape base OUT

Llama shapes: `7b` (Llama-2-7B: hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000: 6.74B parameters),
`1.1b` (TinyLlama: hidden 2048, MLP 5632, 22 layers, 32 / 4 KV heads), `tiny` (a CPU-sized one of the same
layout). ViT shapes: `base` (ViT-B/16 at 224 pixels, 86M parameters), `tiny` (32 pixels). Nothing is downloaded:
weights are drawn from the model's own initialiser, on the GPU when there is one (a 7B base builds in seconds
there, minutes on a CPU); the tokenizer is a word-level one over a few words, whose ids all fit the vocabulary.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

from fedmeki_core.models.injection import word_tokenizer

WORDS = ["which", "option", "treats", "the", "heart", "lung", "fever", "pain", "a", "b", "c", "d", "?", ":"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "1.1b": {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}
VIT_SHAPES: dict[str, dict[str, int]] = {
    "base": {
        "image_size": 224,
        "patch_size": 16,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "tiny": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}


def _build_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def save_llama(folder: Path, shape: str, dtype: torch.dtype, layers: int | None = None, max_length: int = 512) -> int:
    """A Llama of `shape` (`layers` decoder layers if given) in `dtype`, saved as safetensors with its tokenizer;
    its parameter count."""
    tokenizer = word_tokenizer(WORDS)
    sizes: dict[str, Any] = dict(LLAMA_SHAPES[shape])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    config = LlamaConfig(
        **sizes,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=dtype,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in the saved dtype: a bf16 base never exists in fp32 here
    try:
        with _build_device():
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="4GB")
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return params


def save_vit(folder: Path, shape: str, num_labels: int = 2) -> int:
    """A ViT image classifier of `shape` (3 channels, float32), saved as safetensors; its parameter count."""
    sizes: dict[str, Any] = dict(VIT_SHAPES[shape])
    config = ViTConfig(**sizes, num_channels=3)
    config.num_labels = num_labels
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("kind", choices=["llama", "vit"])
    parser.add_argument("out", type=Path, help="the folder to write (a hospital's save_pretrained folder)")
    parser.add_argument(
        "--shape", required=True, help=f"llama: {', '.join(LLAMA_SHAPES)}; vit: {', '.join(VIT_SHAPES)}"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="llama's saved weights")
    args = parser.parse_args()
    shapes = LLAMA_SHAPES if args.kind == "llama" else VIT_SHAPES
    if args.shape not in shapes:
        parser.error(f"{args.kind} --shape is one of {', '.join(shapes)}, not {args.shape!r}")
    if args.kind == "llama":
        params = save_llama(args.out, args.shape, DTYPES[args.dtype])
    else:
        params = save_vit(args.out, args.shape)
    print(f"{args.kind} {args.shape}: {params:,} parameters in {args.out}")


if __name__ == "__main__":
    main()
