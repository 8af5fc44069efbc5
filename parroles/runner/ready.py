"""The runs that may start now, in the order they start, and how many go to a worker at once (parent only).

The order is the batch's ``order``: ``"longest_first"`` (the default) starts
the ready run expected to take longest first, so that a long role given last
does not leave the batch waiting for it alone at the end; a run with no
history (``runner.history``) counts as longest, in the order given, since it
may be long. ``"given"`` starts them in the order given. Either way a run
starts only once its needs allow (``runner.batch``).

Short roles travel in chunks (one pool round trip for many roles), sized from
the mean duration measured so far so that a chunk is about ``CHUNK_SECONDS``
of work; roles of unknown or long duration travel one at a time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

from parroles.runner.tracked import TrackedRun

CHUNK_SECONDS = 0.02  # work per chunk aimed at, from the mean duration measured so far


class ReadyRuns:
    """A heap of READY runs: by expected duration, longest first (unknown first of all), then position."""

    def __init__(self, expected_ms: Mapping[int, float] | None = None) -> None:
        self._heap: list[tuple[float, int, TrackedRun]] = []
        self._expected = expected_ms  # by position; None: the order given
        self._mean_ms: float | None = None  # running mean duration of the roles that ended

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, run: TrackedRun) -> None:
        rank = 0.0 if self._expected is None else -self._expected.get(run.position, math.inf)
        heapq.heappush(self._heap, (rank, run.position, run))

    def pop(self) -> TrackedRun:
        return heapq.heappop(self._heap)[2]

    def clear(self) -> None:
        self._heap = []

    def ended(self, duration_ms: float) -> None:
        """A run ended after ``duration_ms``: the chunk size follows the mean."""
        self._mean_ms = duration_ms if self._mean_ms is None else 0.9 * self._mean_ms + 0.1 * duration_ms

    def chunk_size(self, max_chunk: int) -> int:
        if self._mean_ms is None:
            return 1
        return max(1, min(max_chunk, int(CHUNK_SECONDS * 1000 / max(self._mean_ms, 1e-3))))
