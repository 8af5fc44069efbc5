"""Where things go in a report's drawings: the timeline's lanes and the graph's layers. Pure functions.

A lane is a row of the timeline that holds runs that did not overlap in time: packed from the runs'
intervals, not read from ``worker_pid`` (a pid may serve several slots over a batch, and a Dask
worker's pid says nothing of its slots), they come out as one lane per worker slot busy at once.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

Node = TypeVar("Node", bound=Hashable)
BARYCENTER_SWEEPS = 4  # passes that order each layer by where its nodes' neighbours sit; few are needed


def pack_lanes(spans: Sequence[tuple[float, float]]) -> list[int]:
    """A lane for each ``(start, end)``, in the order given: the lowest lane free at its start.

    Intervals that touch (one ends as the next starts) may share a lane, as a worker slot passes from
    one run to the next. Uses as many lanes as intervals overlap at most.
    """
    lanes = [0] * len(spans)
    busy: list[tuple[float, int]] = []  # (end, lane) of the lanes in use, soonest free first
    free: list[int] = []  # lanes that have been used and are free again, lowest first
    count = 0
    for index in sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1])):
        start, end = spans[index]
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane, count = count, count + 1
        lanes[index] = lane
        heapq.heappush(busy, (max(start, end), lane))
    return lanes


def layers(nodes: Sequence[Node], edges: Sequence[tuple[Node, Node]]) -> dict[Node, int]:
    """Each node's layer: 0 for one that needs nothing, else one more than the deepest node it needs
    (the longest path to it). Edges naming unknown nodes are ignored; so is a cycle's closing edge."""
    known = set(nodes)
    before: dict[Node, list[Node]] = defaultdict(list)
    after: dict[Node, list[Node]] = defaultdict(list)
    for source, target in edges:
        if source in known and target in known and source != target:
            before[target].append(source)
            after[source].append(target)
    waiting = {node: len(before[node]) for node in nodes}
    ready = [node for node in nodes if waiting[node] == 0]
    layer = dict.fromkeys(nodes, 0)
    while ready:
        node = ready.pop()
        for target in after[node]:
            layer[target] = max(layer[target], layer[node] + 1)
            waiting[target] -= 1
            if waiting[target] == 0:
                ready.append(target)
    return layer


def order_in_layers(nodes: Sequence[Node], edges: Sequence[tuple[Node, Node]],
                    layer: Mapping[Node, int]) -> dict[Node, int]:
    """Each node's row within its layer: first in the order given, then by the mean row of its neighbours
    in the layers before and after (a few sweeps), which keeps edges short and seldom crossing."""
    by_layer: dict[int, list[Node]] = defaultdict(list)
    for node in nodes:
        by_layer[layer[node]].append(node)
    neighbours: dict[Node, list[Node]] = defaultdict(list)
    for source, target in edges:
        if source in layer and target in layer:
            neighbours[target].append(source)
            neighbours[source].append(target)
    row = {node: index for members in by_layer.values() for index, node in enumerate(members)}
    depths = sorted(by_layer)
    for sweep in range(BARYCENTER_SWEEPS):
        for depth in depths if sweep % 2 == 0 else reversed(depths):
            members = by_layer[depth]
            members.sort(key=lambda node: _barycenter(node, neighbours[node], row))
            row.update((node, index) for index, node in enumerate(members))
    return row


def _barycenter(node: Node, neighbours: Sequence[Node], row: Mapping[Node, int]) -> float:
    if not neighbours:
        return float(row[node])
    return sum(row[other] for other in neighbours) / len(neighbours)
