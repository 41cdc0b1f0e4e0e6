"""Injector: the injection stage, run by a silo agent with the injector role at the coordinator's site.

For checkpoint N of a job it loads the averaged encoders, builds the injection model (the frozen language model
stays on this machine), continues the adapters of checkpoint N-1, fine-tunes them on the public split of the
training tasks (not for checkpoint 0: that is the untrained baseline), and scores generated answers on the test
split of every task of the suite. Adapters are kept per checkpoint, so a restarted injector loses nothing.

With several devices (silo.yaml `devices`) the agent launches the injection as it launches a training round
(silo_agent/distributed.py): each rank runs `inject`, takes its share of every fine-tuning batch, and the ranks
sum their gradients (`sharding: fsdp`: FSDP shards the model, language model included, and sums them), so the
adapters are those one process would train on the whole batch; every rank scores the whole test split (a sharded
model's passes are collectives), and rank 0 alone writes the adapters.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch.distributed.tensor import DTensor

from fedmeki_core.architectures import ARCHITECTURES
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.files import atomic_write
from fedmeki_core.models.build import build_model
from fedmeki_core.models.encoders import MultiTaskEncoders
from fedmeki_core.models.injection import (
    InjectionModel,
    build_injection_model,
    injection_settings,
    label_prompts,
    task_vocabulary,
)
from fedmeki_core.records import RoundTask
from fedmeki_core.tasks import LabelType, get_task, injection_tasks
from fedmeki_core.tasks.dataset import ArrayDataset
from fedmeki_core.tasks.scoring import binary_scores, text_scores
from fedmeki_core.training.local_training import data_parallel_rank, sum_across_ranks
from silo_agent.sharding import gathered, shard
from silo_agent.trainer import LocalTrainer, job_image_size, load_exchanged

logger = logging.getLogger(__name__)

_ADAPTERS = re.compile(r"adapters-(\d{5})\.safetensors")
_EVAL_BATCH = 64


class Injector:
    def __init__(self, trainer: LocalTrainer, work_dir: Path) -> None:
        self._trainer = trainer  # its device and its data splits: (public fine-tuning split, test split)
        self._work_dir = work_dir

    def inject(self, task: RoundTask, checkpoint: Path) -> tuple[int, dict[str, float]]:
        """Fine-tune (after round 0) and evaluate the injection model on checkpoint `task.round`'s encoders."""
        spec, injection = task.spec, task.spec.injection
        fine_tune_on, scored = injection_tasks(spec.task)
        if injection is None or not fine_tune_on:
            raise InvalidInputError(f"job {task.job_id} has no injection stage")
        base = self._trainer.bases.injection_base(spec)  # checked before anything is built
        token_dim = int({**ARCHITECTURES[spec.model.architecture], **spec.model.config}["token_dim"])
        encoders = build_model(spec.model, spec.task, seed=spec.seed)
        assert isinstance(encoders, MultiTaskEncoders)  # the job spec allows injection with these only
        load_exchanged(encoders, checkpoint, task.manifest)
        splits = {name: self._trainer.splits(name, job_image_size(task)) for name in scored}
        folder = self._job_folder(task.job_id)
        model = build_injection_model(
            encoders,
            injection_settings(injection, base),
            self._vocabulary(folder, splits),
            token_dim,
            seed=spec.seed,
        )
        self._resume(model, folder, task.round)  # whole tensors, before they are placed or sharded
        rank, ranks = data_parallel_rank()
        sharded = self._trainer.sharding == "fsdp" and ranks > 1
        if sharded:
            shard(model, self._trainer.device)
        else:
            model.to(self._trainer.device)
        metrics: dict[str, float] = {}
        if task.round > 0:
            public = {name: splits[name][0] for name in fine_tune_on}
            metrics["injection_loss"] = self._fine_tune(
                model,
                public,
                injection.epochs,
                injection.batch_size,
                injection.learning_rate,
                seed=spec.seed * 7919 + task.round,
            )
        tests = {name: held for name, (_, held) in splits.items()}
        for name, data in tests.items():
            for key, value in self._score(model, name, data).items():
                metrics[f"{name}.{key}"] = value
        adapters = gathered(model.trainable_state()) if sharded else model.trainable_state()
        if rank == 0:
            with atomic_write(folder / f"adapters-{task.round:05d}.safetensors") as f:
                f.write(save({k: v.detach().cpu().contiguous() for k, v in adapters.items()}))
        return sum(map(len, tests.values())), metrics

    def _job_folder(self, job_id: str) -> Path:
        folder = self._work_dir / "injector" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _vocabulary(self, folder: Path, splits: Mapping[str, tuple[ArrayDataset, ArrayDataset]]) -> list[str]:
        """The tiny model's words, fixed at the job's first injection (its embedding table depends on them)."""
        path = folder / "vocabulary.json"
        if path.is_file():
            return list(json.loads(path.read_text()))
        texts = [
            text
            for train, held in splits.values()
            for data in (train, held)
            for text in (*data.questions, *data.answers)
        ]
        vocabulary = task_vocabulary(texts)
        with atomic_write(path) as f:
            f.write(json.dumps(vocabulary).encode())
        return vocabulary

    def _resume(self, model: InjectionModel, folder: Path, round_number: int) -> None:
        """Load the adapters of the newest earlier checkpoint, if any."""
        earlier = sorted(
            int(m.group(1))
            for p in folder.iterdir()
            if (m := _ADAPTERS.fullmatch(p.name)) and int(m.group(1)) < round_number
        )
        if not earlier:
            return
        state = load_file(str(folder / f"adapters-{earlier[-1]:05d}.safetensors"))
        trainable = model.trainable_state()
        if state.keys() != trainable.keys():
            raise InvalidInputError(f"{folder}: the stored adapters do not fit this job's injection model")
        with torch.no_grad():
            for name, value in state.items():
                trainable[name].copy_(value)

    def _fine_tune(
        self,
        model: InjectionModel,
        public: Mapping[str, ArrayDataset],
        epochs: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
    ) -> float:
        """Instruction fine-tuning on the public data: batches of one task each, tasks interleaved at random; with
        several ranks, each takes every `ranks`-th sample of a batch and weighs its loss by its share of the batch's
        answer tokens (the loss is their mean), so that the summed gradient is the whole batch's."""
        device = self._trainer.device
        params = list(model.trainable_state().values())
        optimizer = torch.optim.AdamW(params, lr=learning_rate)
        rng = np.random.default_rng(seed)  # the same batches at every rank
        rank, ranks = data_parallel_rank()
        sharded = any(isinstance(p, DTensor) for p in params)
        losses = []
        model.train()
        # The encoders are frozen here: they normalise with their running statistics, not the batch's (which would
        # differ between a rank's share and the whole batch, and would move the federated encoders' statistics).
        model.encoders.eval()
        for _ in range(epochs):
            batches = [
                (name, order[start : start + batch_size])
                for name, data in public.items()
                for order in [rng.permutation(len(data))]
                for start in range(0, len(data), batch_size)
            ]
            for index in rng.permutation(len(batches)):
                name, rows = batches[index]
                data = public[name].subset(rows)
                questions, answers = _prompts(name, data)
                mine = list(range(rank, len(rows), ranks))
                optimizer.zero_grad(set_to_none=True)
                batch_loss = 0.0
                if mine or sharded:  # a sharded rank with no sample joins FSDP's collectives with one weighing 0
                    part = mine or [0]
                    share = model.answer_tokens([answers[i] for i in mine]) / model.answer_tokens(answers)
                    features = torch.from_numpy(data.features[part]).to(device)
                    with self._autocast():
                        loss = model.loss(
                            features,
                            get_task(name).modality,
                            [name] * len(part),
                            [questions[i] for i in part],
                            [answers[i] for i in part],
                        )
                    # FSDP averages the ranks' gradients: times the world size, the average is their sum
                    (loss * (share * ranks if sharded else share)).backward()  # type: ignore[no-untyped-call]
                    batch_loss = float(loss.detach()) * share
                losses.append(self._summed(params, batch_loss, sharded))
                optimizer.step()
        logger.info("injection: %d steps, mean loss %.4f", len(losses), float(np.mean(losses)) if losses else 0.0)
        return float(np.mean(losses[-max(1, len(losses) // 4) :])) if losses else 0.0

    @staticmethod
    def _summed(params: list[torch.Tensor], loss: float, sharded: bool) -> float:
        """The batch's loss summed over the ranks, and (not sharded: FSDP did it) their gradients too."""
        if data_parallel_rank()[1] == 1:
            return loss
        if not sharded:
            return sum_across_ranks(params, loss)
        total = torch.tensor([loss], dtype=torch.float64, device=params[0].device)
        torch.distributed.all_reduce(total)
        return float(total)

    def _autocast(self) -> torch.autocast:
        """The silo's mixed precision on CUDA (bf16 where supported); a no-op on the CPU."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self._trainer.autocast)
        return torch.autocast("cuda", dtype=dtype, enabled=dtype is not None)

    def _score(self, model: InjectionModel, name: str, data: ArrayDataset) -> dict[str, float]:
        model.eval()
        info = get_task(name)
        questions, references = _prompts(name, data)
        generated: list[str] = []
        for start in range(0, len(data), _EVAL_BATCH):
            features = torch.from_numpy(data.features[start : start + _EVAL_BATCH]).to(self._trainer.device)
            with self._autocast():
                generated += model.generate(
                    features, info.modality, [name] * len(features), questions[start : start + _EVAL_BATCH]
                )
        if info.label_type == LabelType.TEXT:
            return text_scores(generated, references)
        return binary_scores(generated, data.labels.tolist())


def _prompts(name: str, data: ArrayDataset) -> tuple[list[str], list[str]]:
    """Questions and reference answers: the dataset's own, or the task's question with yes/no from the labels."""
    if data.questions:
        return list(data.questions), list(data.answers)
    return label_prompts(name, data.labels.tolist())
