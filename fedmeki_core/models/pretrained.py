"""A pretrained base from a local folder with LoRA adapters (peft) and heads that train; everything else frozen.

`causal-lm`: `AutoModelForCausalLM`, trained on the answer tokens of instructions (tasks/instructions.py);
`image-classifier`: `AutoModelForImageClassification` (ViT, DeiT) with a head of the task's class count. The
exchanged tensors are the trainable parameters only (`exchanged_state`): adapters and heads, never the base.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.model_spec import ModelSpec
from fedmeki_core.models.base_folder import safetensors_files
from fedmeki_core.tasks import get_task
from fedmeki_core.tasks.scoring import instruction_scores

_IGNORE = -100
_EVAL_BATCH = 32


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The base's own tokenizer from its folder (a pad token set to EOS where it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{folder}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization(spec: ModelSpec, device: torch.device) -> dict[str, Any]:
    """from_pretrained arguments of a QLoRA base (4-bit NF4, bf16 compute); none for a plain one."""
    if spec.quantization == "none":
        return {}
    if device.type != "cuda":
        raise InvalidInputError(f"quantization 4bit (QLoRA) needs a CUDA device; this silo trains on {device.type}")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    return {"quantization_config": config, "device_map": {"": device}}


def _load_base(spec: ModelSpec, task: str, folder: Path, device: torch.device) -> PreTrainedModel:
    safetensors_files(folder)  # config.json, no pickle, some safetensors: checked before anything is loaded
    common: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, **_quantization(spec, device)}
    try:
        if spec.architecture == "causal-lm":
            model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(folder, **common)
        else:
            model = AutoModelForImageClassification.from_pretrained(
                folder, num_labels=get_task(task).num_classes, ignore_mismatched_sizes=True, **common
            )
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"{folder}: cannot load the base ({str(exc).splitlines()[0][:200]})") from None
    return model


def _add_adapters(spec: ModelSpec, base: PreTrainedModel) -> nn.Module:
    """The base frozen, LoRA on the target modules, and the heads (plus a classifier's new head) trainable."""
    base.requires_grad_(False)
    model: nn.Module = base
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        if spec.quantization == "4bit":
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base)  # type: ignore[no-untyped-call]
        names = [name for name, _ in base.named_modules()]
        for target in spec.lora.target_modules:
            if not any(name == target or name.endswith(f".{target}") for name in names):
                raise InvalidInputError(f"model.lora.target_modules: the base has no module {target!r}")
        config = LoraConfig(
            r=spec.lora.rank,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=list(spec.lora.target_modules),
        )
        model = get_peft_model(base, config)
    heads = list(spec.heads) + (["*classifier"] if spec.architecture == "image-classifier" else [])
    for pattern in heads:
        matched = [module for name, module in model.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]
        if not matched and pattern in spec.heads:
            raise InvalidInputError(f"model.heads: no module of the base matches {pattern!r}")
        for module in matched:
            module.requires_grad_(True)
    return model


class PretrainedModel(nn.Module):
    """The adapted base; its trainable parameters are what a round exchanges."""

    def __init__(self, spec: ModelSpec, task: str, folder: Path, device: torch.device, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the adapters' (and a new head's) initial values: the submitter's are checkpoint 0
        self.base = _add_adapters(spec, _load_base(spec, task, folder, device))
        self.folder = folder

    @property
    def head(self) -> nn.Module:
        """The module that turns representations into outputs (MOON's contrast is on what it takes)."""
        output_embeddings = getattr(self.base, "get_output_embeddings", None)
        head = output_embeddings() if callable(output_embeddings) else None
        if not isinstance(head, nn.Module):
            head = getattr(self.base, "classifier", None)
        if not isinstance(head, nn.Module):
            raise InvalidInputError(f"the base in {self.folder} has no output head")
        return head


class PretrainedClassifier(PretrainedModel):
    """An image classifier: grey [B, 1, S, S] images standardised per image, repeated to the base's channels."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mean = features.mean(dim=(1, 2, 3), keepdim=True)
        std = features.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        channels = int(getattr(self.base.config, "num_channels", 1))
        images = ((features - mean) / std).expand(-1, channels, -1, -1)
        logits: torch.Tensor = self.base(pixel_values=images).logits
        return logits


class PretrainedCausalLM(PretrainedModel):
    """A causal LM on token sequences: features [B, L] are token ids padded with -1, labels [B] the prompt's
    length; the loss is the next-token cross-entropy of the answer's tokens only."""

    def __init__(self, spec: ModelSpec, task: str, folder: Path, device: torch.device, seed: int) -> None:
        super().__init__(spec, task, folder, device, seed)
        self.tokenizer = load_tokenizer(folder)

    def loss_terms(self, features: torch.Tensor, labels: torch.Tensor) -> int:
        """How many answer tokens `batch_loss` averages over: what a part of a batch weighs in the batch's loss."""
        tokens = features[:, 1:] >= 0
        positions = torch.arange(1, features.shape[1], device=features.device).unsqueeze(0)
        return int((tokens & (positions >= labels.unsqueeze(1))).sum())

    def batch_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        width = int((features >= 0).sum(dim=1).max())
        ids = features[:, :width].long()
        mask = ids >= 0
        positions = torch.arange(width, device=ids.device).unsqueeze(0)
        targets = torch.where(mask & (positions >= labels.unsqueeze(1)), ids, _IGNORE)
        logits = self.base(input_ids=ids.clamp_min(0), attention_mask=mask.long()).logits
        return nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=_IGNORE
        )

    def answer(self, features: torch.Tensor, labels: torch.Tensor, max_new_tokens: int) -> list[str]:
        """Greedy answers to the prompts (each row's first labels[i] tokens), left-padded into one batch."""
        prompts = [row[: int(length)].long() for row, length in zip(features, labels, strict=True)]
        width = max(len(p) for p in prompts)
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=features.device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        generated = self.base.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        return [str(text).strip() for text in texts]

    def scores(self, features: torch.Tensor, labels: torch.Tensor, references: list[str]) -> dict[str, float]:
        """Answer-token loss and the scores of greedy answers on held-out data (tasks/scoring.instruction_scores)."""
        losses, answers = [], []
        for start in range(0, len(features), _EVAL_BATCH):
            batch, lengths = features[start : start + _EVAL_BATCH], labels[start : start + _EVAL_BATCH]
            losses.append(float(self.batch_loss(batch, lengths)) * len(batch))
            longest = int(((batch >= 0).sum(dim=1) - lengths).max())
            answers.extend(self.answer(batch, lengths, max(1, longest)))
        return {"loss": sum(losses) / max(len(features), 1), **instruction_scores(answers, references)}


def build_pretrained(spec: ModelSpec, task: str, folder: Path, device: torch.device, seed: int) -> PretrainedModel:
    """The job's model on the base in `folder` (checked: a save_pretrained folder, safetensors only)."""
    kind = PretrainedCausalLM if spec.architecture == "causal-lm" else PretrainedClassifier
    return kind(spec, task, folder, device, seed)
