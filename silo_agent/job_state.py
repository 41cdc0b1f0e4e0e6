"""What a silo keeps of a job between its rounds: its own tensors (SCAFFOLD's c_i, Ditto's personal model, the
personal layers of FedBN/FedPer), one safetensors file per round, never sent anywhere.

A round reads the newest state of an earlier round and writes its own under its round number, so a round trained
again after a crash starts from the same state and the state never advances twice.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.files import atomic_write


class JobStateStore:
    """The state files of one job, in the job's folder of the agent's work dir; `kind` names a separate series
    (the client half's state, or the error-feedback residual of silo_agent/error_feedback.py)."""

    def __init__(self, folder: Path, kind: str = "client-state") -> None:
        self.folder = folder
        self.kind = kind
        self._file = re.compile(re.escape(kind) + r"-(\d{5,})\.safetensors")

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := self._file.fullmatch(p.name)))

    def _path(self, round_number: int) -> Path:
        return self.folder / f"{self.kind}-{round_number:05d}.safetensors"

    def load(self, before_round: int) -> dict[str, torch.Tensor]:
        """The state the newest round before `before_round` left (empty when there is none)."""
        earlier = [r for r in self._rounds() if r < before_round]
        if not earlier:
            return {}
        path = self._path(earlier[-1])
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise InvalidInputError(f"the job state {path} is unreadable ({exc}); remove it to start over") from exc

    def save(self, round_number: int, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        data = save({name: tensor.contiguous() for name, tensor in tensors.items()})
        with atomic_write(self._path(round_number)) as f:
            f.write(data)

    def discard(self, round_number: int) -> None:
        """Forget what round `round_number` wrote (its update never reached the coordinator)."""
        self._path(round_number).unlink(missing_ok=True)

    def prune(self, before_round: int) -> None:
        """Delete the states of rounds before `before_round` once a later one is kept (its round has ended)."""
        kept = [r for r in self._rounds() if r <= before_round]
        for round_number in kept[:-1]:
            self._path(round_number).unlink(missing_ok=True)
