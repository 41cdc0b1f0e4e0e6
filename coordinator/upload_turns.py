"""Upload turns: an upload refused at the cap is told when to come back, so that refused uploads return spread at
the rate uploads finish instead of all at once.

With hundreds of silos finishing a round's training together, most of their uploads find the `max_concurrent_uploads`
slots taken. Retried on a blind backoff they come back in bursts (each burst refused again, each refusal a call,
an audit row and bytes sent for nothing) and late (a slot can stay free for seconds of backoff). Here each refusal
gets the next turn: the turns are `mean upload time / cap` apart, the pace at which slots free up, so the N-th
refused upload returns about when the N-th slot frees. Turns are handed out in the order of refusal, so the first
refused comes back first; a silo that came back at its turn and still found no slot free (another upload got in
first) is not sent to the back of the line: it is told the next slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from coordinator.pacing import Slots
from fedmeki_core.errors import BusyError
from fedmeki_core.rpc_errors import LONGEST_TOLD_WAIT_SECONDS

_FIRST_GUESS_SECONDS = 1.0  # an upload's duration before one was measured
_SMOOTHING = 0.2  # the weight of the newest upload's duration in the running mean
_REMEMBERED = 4096  # turns remembered at most (one per silo refused): past it, those long past are forgotten


class UploadTurns:
    """`hold()` an upload slot of `slots`; one refused carries the wait until its turn (`BusyError.retry_after`)."""

    def __init__(self, slots: Slots, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._slots = slots
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._mean_seconds = _FIRST_GUESS_SECONDS
        self._last_turn = -1.0  # the latest turn handed out (monotonic seconds)
        self._promised: dict[str, float] = {}  # silo id -> its turn, until it gets a slot

    @property
    def mean_seconds(self) -> float:
        """The running mean of how long an upload holds its slot."""
        return self._mean_seconds

    @contextmanager
    def hold(self, silo_id: str) -> Iterator[None]:
        """One upload slot while the block runs; none free: BusyError with the wait until this silo's turn."""
        with ExitStack() as slot:
            try:
                slot.enter_context(self._slots.hold())
            except BusyError as exc:
                raise BusyError(exc.message, retry_after=self.next_turn(silo_id)) from None
            with self._lock:
                self._promised.pop(silo_id, None)
            started = self._clock()
            try:
                yield
            finally:
                self._finished(self._clock() - started)

    def check(self, silo_id: str) -> None:
        """Refuse now, as `hold` would, if every slot is taken (an upload's first call asks, before its bytes)."""
        if self._slots.in_use >= self._limit:
            raise BusyError(
                f"{self._limit} uploads are in progress, the most this coordinator takes at once "
                "(max_concurrent_uploads); retry when told",
                retry_after=self.next_turn(silo_id),
            )

    def next_turn(self, silo_id: str) -> float:
        """Seconds from now until the silo's turn: the next not yet handed out, or, for a silo whose turn has come
        already, the next slot to free up."""
        now = self._clock()
        with self._lock:
            spacing = self._mean_seconds / self._limit
            promised = self._promised.get(silo_id)
            if promised is not None and promised <= now + spacing:
                turn = now + spacing
            else:
                # a turn further out is not promised (nor believed by the client): the silo asks again by then
                turn = min(max(now, self._last_turn) + spacing, now + LONGEST_TOLD_WAIT_SECONDS)
                self._last_turn = max(self._last_turn, turn)
            if len(self._promised) >= _REMEMBERED:
                forgotten = now - LONGEST_TOLD_WAIT_SECONDS
                self._promised = {silo: at for silo, at in self._promised.items() if at > forgotten}
            self._promised[silo_id] = turn
        return turn - now

    def _finished(self, seconds: float) -> None:
        with self._lock:
            self._mean_seconds += _SMOOTHING * (seconds - self._mean_seconds)
