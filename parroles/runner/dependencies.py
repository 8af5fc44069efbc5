"""Which roles of a batch may start, in the parent: each role waits until every role it needs has ended."""

from __future__ import annotations

from collections.abc import Sequence


class Dependencies:
    """The batch's graph as the parent schedules it, by position in the batch."""

    def __init__(self, needs: Sequence[tuple[int, ...]]) -> None:
        self._missing = [set(needed) for needed in needs]
        self._dependents: list[list[int]] = [[] for _ in needs]
        for position, needed in enumerate(needs):
            for upstream in needed:
                self._dependents[upstream].append(position)

    def dependents(self, position: int) -> list[int]:
        """The roles that need ``position`` directly, in batch order."""
        return sorted(self._dependents[position])

    def met(self, position: int, dependent: int) -> bool:
        """``dependent`` no longer waits for ``position``; True once it waits for nothing."""
        missing = self._missing[dependent]
        missing.discard(position)
        return not missing
