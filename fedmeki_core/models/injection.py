"""Knowledge injection: the federated encoders feed a frozen causal language model through trained projections.

The prompt is `<s> [K modality tokens] task: ... question: ... answer:` and the model learns to generate the
answer. Trainable: the projections and the adapter, LoRA (peft) or a mixture of LoRA experts whose gate attends
to the task and modality description. The language model is any causal LM in a local Hugging Face folder, or
`tiny-llama`: a small Llama built from its config, with a word-level vocabulary, for tests and the demo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import InjectionSpec
from fedmeki_core.models.encoders import MultiTaskEncoders
from fedmeki_core.tasks import TASKS, Modality
from fedmeki_core.tasks.scoring import words

TINY_LLM = "tiny-llama"
_SPECIAL_ROLES = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
_SPECIALS = list(_SPECIAL_ROLES.values())


@dataclass(frozen=True)
class InjectionSettings:
    language_model: str  # "tiny-llama" or a local save_pretrained folder (a named base's, at the injector)
    adapter: str  # "lora" or "moe-lora"
    lora_rank: int
    lora_alpha: int
    experts: int
    top_k: int
    modality_tokens: int  # encoder tokens are pooled to this many prefix embeddings
    max_answer_tokens: int


def word_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocabulary` (lower-case words); unknown words become <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    table = {token: index for index, token in enumerate([*_SPECIALS, *sorted(set(vocabulary) - set(_SPECIALS))])}
    core = Tokenizer(models.WordLevel(table, _SPECIAL_ROLES["unk_token"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=core, **_SPECIAL_ROLES)  # type: ignore[no-untyped-call]


def task_vocabulary(texts: Sequence[str]) -> list[str]:
    """Every word of the task catalogue's prompts and of `texts` (the injector's questions and answers)."""
    found = set(words(" ".join(texts)))
    for task in TASKS.values():
        if task.modality == Modality.TEXT:  # a pretrained LM's task with its own tokenizer, never injected
            continue
        found.update(words(f"{prompt_text(task.name, '')} {task.question} {task.modality} yes no"))
    return sorted(found)


def prompt_text(task: str, question: str) -> str:
    info = TASKS[task]
    return f"task: {info.description}. modality: {info.modality}. question: {question or info.question} answer:"


def description_text(task: str) -> str:
    info = TASKS[task]
    return f"{info.description}. modality: {info.modality}"


def load_language_model(
    settings: InjectionSettings, vocabulary: Sequence[str], seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen language model and its tokenizer; a local folder never reaches for a hub."""
    if settings.language_model == TINY_LLM:
        tokenizer: PreTrainedTokenizerBase = word_tokenizer(vocabulary)
        torch.manual_seed(seed)
        model: PreTrainedModel = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                # Wider than the default 0.02: behind a frozen RMSNorm, 0.02 caps the logit gap between two
                # words near 2.5 nats, too little for a random frozen model to learn to answer by adapters.
                initializer_range=0.15,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    else:
        folder = Path(settings.language_model)
        if not (folder / "config.json").is_file():
            raise InvalidInputError(f"language model {folder}: not a local Hugging Face model folder (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    model.requires_grad_(False)
    return model, tokenizer


class MoELoraLinear(nn.Module):
    """A frozen linear layer plus a mixture of LoRA experts; the model sets `route` [B, E] before each forward."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, alpha: float, top_k: int, gate_dim: int) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(experts, rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(experts, base.out_features, rank))  # zero: starts as the base
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.gate = nn.Linear(gate_dim, experts)
        self.scaling = alpha / rank
        self.top_k = top_k
        self.context: torch.Tensor | None = None  # [B, gate_dim], the attended task/modality description

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if self.context is None:
            return out
        logits = self.gate(self.context)
        top = logits.topk(self.top_k, dim=-1)
        # Under autocast the gate's logits are bf16/fp16 but softmax runs in float32: route in float32.
        weights = torch.softmax(top.values.float(), dim=-1)
        route = torch.zeros_like(logits, dtype=weights.dtype).scatter(-1, top.indices, weights)
        low = torch.einsum("bti,eri->bter", x, self.lora_a.to(x.dtype)) * route[:, None, :, None].to(x.dtype)
        return out + torch.einsum("bter,eor->bto", low, self.lora_b.to(x.dtype)) * self.scaling


def _decoder_linears(model: PreTrainedModel) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every linear layer of the language model but its output head: (parent, attribute, layer)."""
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    found = []
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if isinstance(child, nn.Linear) and child is not head:
                found.append((parent, attribute, child))
    return found


def injection_settings(spec: InjectionSpec, base: Path | None = None) -> InjectionSettings:
    """The stage's settings; `base` is the folder of the spec's named language model (`pretrained`), if any."""
    return InjectionSettings(
        language_model=spec.language_model if base is None else str(base),
        adapter=spec.adapter,
        lora_rank=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        experts=spec.experts,
        top_k=spec.top_k,
        modality_tokens=spec.modality_tokens,
        max_answer_tokens=spec.max_answer_tokens,
    )


class InjectionModel(nn.Module):
    """Frozen language model; trainable projections, adapter and (MoE-LoRA) description attention.

    The encoders are frozen at the injector (they come from the federated rounds) and trained with the rest when
    the job federates the injection model itself.
    """

    def __init__(
        self,
        encoders: MultiTaskEncoders,
        language_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: InjectionSettings,
        token_dim: int,
        train_encoders: bool = False,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.tokenizer = tokenizer
        self.encoders = encoders.requires_grad_(train_encoders)
        self._embeddings: nn.Module = language_model.get_input_embeddings()
        hidden = int(language_model.config.hidden_size)
        self.projections = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
                for name in encoders.encoders
            }
        )
        self.language_model: nn.Module = language_model
        self.moe_layers: list[MoELoraLinear] = []
        if settings.adapter == "lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules="all-linear", lora_dropout=0.0
            )
            self.language_model = get_peft_model(language_model, config)
        else:
            self.description_query = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))
            for parent, attribute, layer in _decoder_linears(language_model):
                moe = MoELoraLinear(
                    layer, settings.experts, settings.lora_rank, settings.lora_alpha, settings.top_k, hidden
                )
                setattr(parent, attribute, moe)
                self.moe_layers.append(moe)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def answer_tokens(self, answers: Sequence[str]) -> int:
        """How many tokens `loss` averages over for these answers: each cut to max_answer_tokens, and its EOS."""
        cut = self.settings.max_answer_tokens
        return sum(min(len(self.tokenizer(a, add_special_tokens=False)["input_ids"]), cut) + 1 for a in answers)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        embedded: torch.Tensor = self._embeddings(ids)
        return embedded

    def _route(self, tasks: Sequence[str], device: torch.device) -> None:
        """MoE-LoRA: attend over each sample's task/modality description; the gates read the result."""
        if not self.moe_layers:
            return
        batch = self.tokenizer([description_text(t) for t in tasks], return_tensors="pt", padding=True)
        embedded = self._embed_ids(batch["input_ids"].to(device))
        mask = batch["attention_mask"].to(device).bool()
        scores = (embedded @ self.description_query.to(embedded.dtype)).masked_fill(~mask, float("-inf"))
        context = (torch.softmax(scores, dim=-1)[..., None] * embedded).sum(dim=1)
        for layer in self.moe_layers:
            layer.context = context

    def _sequences(
        self,
        features: torch.Tensor,
        modality: Modality,
        tasks: Sequence[str],
        questions: Sequence[str],
        answers: Sequence[str] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded input embeddings, attention mask and labels (-100 but on answer tokens)."""
        device = features.device
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and any(p.requires_grad for p in self.encoders.parameters())
        ):
            tokens = self.encoders.encode(features, modality)
        pooled = nn.functional.adaptive_avg_pool1d(tokens.transpose(1, 2), self.settings.modality_tokens)
        prefix = self.projections[str(modality)](pooled.transpose(1, 2))
        tok = self.tokenizer
        rows_embeds, rows_labels = [], []
        for index, (task, question) in enumerate(zip(tasks, questions, strict=True)):
            prompt = tok(prompt_text(task, question), add_special_tokens=False)["input_ids"]
            answer = [] if answers is None else tok(answers[index], add_special_tokens=False)["input_ids"]
            answer = answer[: self.settings.max_answer_tokens] + ([tok.eos_token_id] if answers is not None else [])
            ids = torch.tensor([tok.bos_token_id, *prompt, *answer], device=device)
            embeds = self._embed_ids(ids)
            rows_embeds.append(torch.cat([embeds[:1], prefix[index].to(embeds.dtype), embeds[1:]]))
            ignored = 1 + prefix.shape[1] + len(prompt)
            rows_labels.append(torch.tensor([-100] * ignored + answer, device=device))
        length = max(row.shape[0] for row in rows_embeds)
        hidden = rows_embeds[0].shape[1]
        embeds = torch.zeros(len(rows_embeds), length, hidden, device=device, dtype=rows_embeds[0].dtype)
        mask = torch.zeros(len(rows_embeds), length, dtype=torch.long, device=device)
        labels = torch.full((len(rows_embeds), length), -100, dtype=torch.long, device=device)
        for index, (row, row_labels) in enumerate(zip(rows_embeds, rows_labels, strict=True)):
            embeds[index, length - row.shape[0] :] = row
            mask[index, length - row.shape[0] :] = 1
            labels[index, length - row.shape[0] :] = row_labels
        return embeds, mask, labels

    def _forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding must not shift the positions
        logits: torch.Tensor = self.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        ).logits
        return logits

    def loss(
        self,
        features: torch.Tensor,
        modality: Modality,
        tasks: Sequence[str],
        questions: Sequence[str],
        answers: Sequence[str],
    ) -> torch.Tensor:
        self._route(tasks, features.device)
        embeds, mask, labels = self._sequences(features, modality, tasks, questions, answers)
        logits = self._forward(embeds, mask)
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())

    @torch.no_grad()
    def generate(
        self, features: torch.Tensor, modality: Modality, tasks: Sequence[str], questions: Sequence[str]
    ) -> list[str]:
        """Greedy answers, at most max_answer_tokens each (the whole prefix is recomputed per step: short answers)."""
        self._route(tasks, features.device)
        embeds, mask, _ = self._sequences(features, modality, tasks, questions, None)
        eos = self.tokenizer.eos_token_id
        generated: list[list[int]] = [[] for _ in tasks]
        done = torch.zeros(len(tasks), dtype=torch.bool, device=features.device)
        for _ in range(self.settings.max_answer_tokens):
            next_ids = self._forward(embeds, mask)[:, -1].argmax(dim=-1)
            for index, token in enumerate(next_ids.tolist()):
                if not done[index] and token != eos:
                    generated[index].append(token)
            done |= next_ids == eos
            if bool(done.all()):
                break
            embeds = torch.cat([embeds, self._embed_ids(next_ids)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return [str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip() for ids in generated]


def build_injection_model(
    encoders: MultiTaskEncoders,
    settings: InjectionSettings,
    vocabulary: Sequence[str],
    token_dim: int,
    seed: int,
    train_encoders: bool = False,
) -> InjectionModel:
    language_model, tokenizer = load_language_model(settings, vocabulary, seed)
    torch.manual_seed(seed + 1)
    return InjectionModel(encoders, language_model, tokenizer, settings, token_dim, train_encoders)


def label_prompts(task: str, labels: Sequence[int]) -> tuple[list[str], list[str]]:
    """A binary task's instructions: its question for every sample, answered "yes" (label 1) or "no"."""
    return [TASKS[task].question] * len(labels), ["yes" if label == 1 else "no" for label in labels]


class InstructionTask(nn.Module):
    """The injection model on one task, for the silos' training loop: its loss is the answer's, not logits'."""

    def __init__(self, model: InjectionModel, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def batch_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        questions, answers = label_prompts(self.task, labels.tolist())
        return self.model.loss(features, TASKS[self.task].modality, [self.task] * len(answers), questions, answers)

    def answer(self, features: torch.Tensor) -> list[str]:
        count = len(features)
        return self.model.generate(features, TASKS[self.task].modality, [self.task] * count, [""] * count)
