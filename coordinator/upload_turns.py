"""Upload turns: an upload refused at the cap is told when to come back, so that refused uploads return spread at
the rate uploads finish instead of all at once.

With hundreds of silos finishing a round's training together, most of their uploads find the `max_concurrent_uploads`
slots taken. Retried on a blind backoff they come back in bursts (each burst refused again, each refusal a call,
an audit row and bytes sent for nothing) and late (a slot can stay free for seconds of backoff). Here each refusal
gets the next turn: the turns are `mean upload time / cap` apart, the pace at which slots free up, so the N-th
refused upload returns about when the N-th slot frees. Turns are handed out in the order of refusal, so the first
refused comes back first; a silo that came back at its turn and still found no slot free (another upload got in
first) is not sent to the back of the line: it is told the next slot.

The cap is on what uploads hold, not only on how many there are: each in progress is charged the memory it may
hold at once (`upload_charge`: its size, or its receive window and the two batches the pool may hold, whichever is
smaller), and uploads are refused past `memory_bytes` of charges as past `limit` of them. With large models that
is `memory_bytes / upload_charge` uploads at once, as many as a count cap would allow; with small ones it lets
hundreds of silos upload together instead of queueing them behind a count meant for large ones (at 256 silos of a
0.4 MB model, each refusal and turn cost more than the upload).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from coordinator.offload import BATCH_BYTES
from coordinator.pacing import Slots
from fedmeki_core.errors import BusyError
from fedmeki_core.rpc_errors import LONGEST_TOLD_WAIT_SECONDS

_FIRST_GUESS_SECONDS = 1.0  # an upload's duration before one was measured
_SMOOTHING = 0.2  # the weight of the newest upload's duration in the running mean
_REMEMBERED = 4096  # turns remembered at most (one per silo refused): past it, those long past are forgotten


def upload_charge(size: int, stream_window_bytes: int) -> int:
    """The memory an upload of `size` bytes may hold at once (0: a size not told yet, charged in full): what its
    client may have in flight (the stream's receive window) and the two batches `Offload.consume` holds."""
    most = stream_window_bytes + 2 * BATCH_BYTES
    return most if size <= 0 else min(size, most)


class UploadTurns:
    """`hold()` an upload slot of `slots`, and its charge of `memory_bytes` (None: uncharged); one refused carries
    the wait until its turn (`BusyError.retry_after`)."""

    def __init__(
        self,
        slots: Slots,
        limit: int,
        clock: Callable[[], float] = time.monotonic,
        memory_bytes: int | None = None,
        stream_window_bytes: int = 0,
    ) -> None:
        self._slots = slots
        self._limit = limit
        self._clock = clock
        self._memory_bytes = memory_bytes
        self._window = stream_window_bytes
        self._charged = 0  # bytes charged to the uploads in progress
        self._lock = threading.Lock()
        self._mean_seconds = _FIRST_GUESS_SECONDS
        self._last_turn = -1.0  # the latest turn handed out (monotonic seconds)
        self._promised: dict[str, float] = {}  # silo id -> its turn, until it gets a slot

    @property
    def mean_seconds(self) -> float:
        """The running mean of how long an upload holds its slot."""
        return self._mean_seconds

    @contextmanager
    def hold(self, silo_id: str, size: int = 0) -> Iterator[None]:
        """One upload slot, charged for an upload of `size` bytes, while the block runs; none free: BusyError with
        the wait until this silo's turn."""
        charge = upload_charge(size, self._window)
        with ExitStack() as slot:
            try:
                slot.enter_context(self._slots.hold())
                slot.enter_context(self._charged_with(charge))
            except BusyError as exc:
                raise BusyError(exc.message, retry_after=self.next_turn(silo_id, charge)) from None
            with self._lock:
                self._promised.pop(silo_id, None)
            started = self._clock()
            try:
                yield
            finally:
                self._finished(self._clock() - started)

    def check(self, silo_id: str, size: int = 0) -> None:
        """Refuse now, as `hold` would, if every slot is taken or the memory charged has no room for an upload of
        `size` bytes (an upload's first call asks, before its bytes)."""
        charge = upload_charge(size, self._window)
        if self._slots.in_use >= self._limit:
            raise BusyError(
                f"{self._limit} uploads are in progress, the most this coordinator takes at once "
                "(max_concurrent_uploads); retry when told",
                retry_after=self.next_turn(silo_id, charge),
            )
        with self._lock:
            full = self._over(charge)
        if full:
            raise BusyError(self._full_message(), retry_after=self.next_turn(silo_id, charge))

    def _over(self, charge: int) -> bool:
        # One upload is always taken when none is in progress, whatever its charge.
        return self._memory_bytes is not None and self._charged > 0 and self._charged + charge > self._memory_bytes

    def _full_message(self) -> str:
        return (
            f"the uploads in progress hold {self._charged >> 20} MiB of buffers, the most this coordinator gives "
            f"them (upload_memory_bytes); retry when told"
        )

    @contextmanager
    def _charged_with(self, charge: int) -> Iterator[None]:
        with self._lock:
            if self._over(charge):
                raise BusyError(self._full_message())
            self._charged += charge
        try:
            yield
        finally:
            with self._lock:
                self._charged -= charge

    def next_turn(self, silo_id: str, charge: int = 0) -> float:
        """Seconds from now until the silo's turn: the next not yet handed out, or, for a silo whose turn has come
        already, the next slot to free up. Slots free at the pace of the uploads that fit at once (`limit`, or
        fewer when uploads of `charge` fill `memory_bytes` first)."""
        now = self._clock()
        at_once = self._limit
        if self._memory_bytes is not None and charge > 0:
            at_once = max(1, min(at_once, self._memory_bytes // charge))
        with self._lock:
            spacing = self._mean_seconds / at_once
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
