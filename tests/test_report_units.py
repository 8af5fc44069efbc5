"""The report's pure parts, without a ledger or a browser: lanes, layers, the diff's summary line."""

from __future__ import annotations

import pytest

from parroles.report import layout
from parroles.report.diff import BatchDiff, RoleChange
from parroles.report.drawing import format_ms
from parroles.results import RunStatus

C, F, X = RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED


def test_lanes_pack_intervals_into_as_few_lanes_as_overlap():
    spans = [(0, 2), (0, 1), (1, 3), (2, 4), (3, 4), (5, 6)]
    lanes = layout.pack_lanes(spans)
    assert max(lanes) + 1 == 2  # never more than two overlap
    for i, (start, end) in enumerate(spans):  # no two runs of a lane overlap
        for j, (other_start, other_end) in enumerate(spans):
            if i < j and lanes[i] == lanes[j]:
                assert end <= other_start or other_end <= start, (spans[i], spans[j])
    assert lanes[-1] == 0  # once every lane is free, the lowest is taken


def test_lanes_of_nothing_and_of_instants():
    assert layout.pack_lanes([]) == []
    assert layout.pack_lanes([(1.0, 1.0), (1.0, 1.0)]) == [0, 0]


def test_layers_are_the_longest_path_to_each_node():
    edges = [("plan", "code"), ("code", "review"), ("code", "test"), ("review", "fix"), ("test", "fix"),
             ("plan", "fix"), ("ghost", "plan")]
    depth = layout.layers(["plan", "code", "review", "test", "fix", "alone"], edges)
    assert depth == {"plan": 0, "code": 1, "review": 2, "test": 2, "fix": 3, "alone": 0}


def test_a_cycle_does_not_hang_the_layering():
    depth = layout.layers(["a", "b"], [("a", "b"), ("b", "a")])
    assert set(depth) == {"a", "b"}


def test_rows_put_children_beside_their_parents():
    nodes = ["a", "b", "x1", "x2", "b1"]
    edges = [("a", "x1"), ("a", "x2"), ("b", "b1")]
    depth = layout.layers(nodes, edges)
    row = layout.order_in_layers(nodes, edges, depth)
    assert sorted(row[n] for n in ("x1", "x2", "b1")) == [0, 1, 2]
    assert row["b1"] == 2  # b is below a: so is its child, below a's two


def change(role: str, a: RunStatus, b: RunStatus, ms_a: float | None, ms_b: float | None, *, output: bool | None = False,
           params: bool = False, reused_b: bool = False) -> RoleChange:
    return RoleChange(role, a, b, ms_a, ms_b, output, params, False, reused_b)


def test_the_summary_line_counts_what_changed():
    diff = BatchDiff("a", "b", (
        change("slow", C, C, 100, 130), change("slower", C, C, 100, 200, output=True),
        change("fast", C, C, 100, 50), change("same", C, C, 100, 110),
        change("breaks", C, F, 100, 300, output=None), change("fixed", F, C, 100, 100, output=None),
        change("reused", C, C, 100, 0, reused_b=True), change("retuned", C, C, 100, 100, output=True, params=True),
    ), only_a=("gone",), only_b=("new", "newer"))
    assert diff.summary() == ("2 slower by >20 %, 1 faster by >20 %, 1 newly failing, 1 newly completing, "
                              "2 outputs changed, 1 params changed, 1 only in a, 2 only in b")
    assert diff.changes[0].ratio == pytest.approx(1.3)
    assert diff.changes[4].ratio is None  # a failed run's time says nothing of its speed
    assert diff.changes[6].ratio is None  # nor does a reused one's
    assert BatchDiff("a", "b", (change("x", C, C, 100, 110),), (), ()).summary().startswith("no differences")
    assert BatchDiff("a", "b", (change("x", C, C, 1, 3),), (), ()).summary().startswith("no differences")  # noise
    assert BatchDiff("a", "b", (change("x", C, C, 100, 100, output=True),), (), ()).summary() == "1 output changed"


def test_durations_read_as_a_person_would():
    assert [format_ms(v) for v in (None, 0.5, 850, 1250, 125_000)] == ["", "0.5 ms", "850 ms", "1.25 s", "2 min 5 s"]
