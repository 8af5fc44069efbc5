"""Which roles of a batch may start, in the parent: each role waits until every role it needs COMPLETED."""

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

    def initially_ready(self) -> list[int]:
        return [position for position, missing in enumerate(self._missing) if not missing]

    def completed(self, position: int) -> list[int]:
        """Roles that may start now that ``position`` COMPLETED, in batch order."""
        ready = []
        for dependent in self._dependents[position]:
            missing = self._missing[dependent]
            missing.discard(position)
            if not missing:
                ready.append(dependent)
        return sorted(ready)

    def downstream(self, position: int) -> list[int]:
        """Every role that needs ``position``, directly or not, in batch order."""
        seen: set[int] = set()
        stack = list(self._dependents[position])
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(self._dependents[node])
        return sorted(seen)
