"""Exponential backoff with full jitter: how every retry in fedmeki waits (agents, transports, the client).

Each wait is drawn uniformly from [0, min(maximum, initial * 2**attempt)], so many silos refused at once
(a restarted or busy coordinator) come back spread out instead of together.
"""

from __future__ import annotations

import random


class Backoff:
    """The waits of one run of retries; `reset()` after a success starts again from `initial`."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def ceiling(self) -> float:
        """The longest the next wait may be."""
        return min(self._maximum, self._initial * 2.0**self._attempt)

    def next_delay(self) -> float:
        """The next wait, in seconds; each call doubles the ceiling of the one after, up to `maximum`."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self._attempt = min(self._attempt + 1, 64)
        return delay

    def reset(self) -> None:
        self._attempt = 0
