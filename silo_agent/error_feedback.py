"""Error feedback for lossy delta encodings (int8, topk): what a round did not transmit joins the next delta.

The residual (corrected delta minus what its encoding decodes to) is kept per job as a safetensors file per round
in the job's folder, beside the client half's state and with the same rules: a round reads the newest residual of an
earlier round and writes its own under its round number, so a round trained again after a crash or an agent restart
starts from the same residual and the residual never advances twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmeki_core.encodings import DeltaEncoding, EncodedPart, encode_tensor
from fedmeki_core.errors import InvalidUpdateError
from silo_agent.job_state import JobStateStore


def residual_store(job_state: JobStateStore) -> JobStateStore:
    """Where a job's residuals live: the job's state folder, as the "residual" series."""
    return JobStateStore(job_state.folder, "residual")


class ErrorFeedback:
    """One round's encoding of a silo's delta with the previous residual added and the new residual kept."""

    def __init__(self, encoding: DeltaEncoding, store: JobStateStore | None, round_number: int) -> None:
        self._encoding = encoding
        self._store = store
        self._round = round_number
        self._residual = store.load(round_number) if store is not None else {}
        self._next: dict[str, torch.Tensor] = {}

    def encode(self, name: str, delta: torch.Tensor, part: EncodedPart, trained: bool) -> list[np.ndarray[Any, Any]]:
        """The wire arrays of tensor `name`'s delta. An untrained tensor (counted for nothing by the coordinator)
        is sent as it is and leaves its residual untouched."""
        held = self._residual.get(name)
        corrected = delta if held is None or not trained else delta + held
        if not bool(torch.isfinite(corrected).all()):
            raise InvalidUpdateError(f"training diverged: the delta of {name!r} has non-finite values")
        arrays, sent = encode_tensor(corrected.numpy(), part, self._encoding)
        if not trained:
            if held is not None:
                self._next[name] = held
        else:
            self._next[name] = corrected - torch.from_numpy(sent)
        return arrays

    def save(self) -> None:
        """Keep this round's residuals (after the delta is written)."""
        if self._store is not None:
            self._store.save(self._round, self._next)
