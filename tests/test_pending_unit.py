"""Records waiting for the ledger writer: how later records merge into earlier ones (no file, no thread)."""

from __future__ import annotations

from parroles.ledger.journal import HEADER, encode, read_journal
from parroles.ledger.pending import NewRuns, Pending


def test_a_later_transition_of_a_run_updates_the_earlier_one():
    earlier, later = Pending(), Pending()
    earlier.run_updates["r1"] = {"status": "RUNNING", "started_at": 1.0}
    later.run_updates["r1"] = {"status": "COMPLETED", "finished_at": 2.0}
    later.run_updates["r2"] = {"status": "RUNNING"}
    earlier.absorb(later)
    assert earlier.run_updates == {"r1": {"status": "COMPLETED", "started_at": 1.0, "finished_at": 2.0},
                                   "r2": {"status": "RUNNING"}}


def test_a_batch_update_merges_into_its_insert_when_both_wait():
    earlier, later = Pending(), Pending()
    earlier.batches["b"] = {"batch_id": "b", "state": "RUNNING", "finished_at": None}
    later.batch_updates["b"] = {"state": "FINISHED", "finished_at": 5.0}
    later.batch_updates["other"] = {"state": "FINISHED", "finished_at": 6.0}
    earlier.absorb(later)
    assert earlier.batches["b"] == {"batch_id": "b", "state": "FINISHED", "finished_at": 5.0}
    assert earlier.batch_updates == {"other": {"state": "FINISHED", "finished_at": 6.0}}


def test_events_and_new_runs_keep_their_order_and_count():
    earlier, later = Pending(), Pending()
    earlier.add_runs(NewRuns(["a"], [0], ["x"], "p", None, None, 1.0))
    later.add_runs(NewRuns(["b", "c"], [1, 2], ["y", "z"], "p", None, None, 1.0))
    earlier.events.append(("a", 1, "k", None, 1.0))
    later.events.append(("a", 2, "k", None, 2.0))
    earlier.absorb(later)
    assert [runs.run_ids for runs in earlier.new_runs] == [["a"], ["b", "c"]]
    assert earlier.new_run_count == 3 and [e[1] for e in earlier.events] == [1, 2]
    assert earlier.rows() == 3 + 2


def test_records_survive_the_journal_unchanged():
    pending = Pending()
    pending.batches["b"] = {"batch_id": "b", "state": "RUNNING", "started_at": 1.5}
    pending.add_runs(NewRuns(["a", "b"], [0, 1], ["x", "y"], "b", "d" * 64, None, 1.5))
    pending.run_updates["a"] = {"status": "COMPLETED", "output": '{"n": 1}', "success": True}
    pending.events.append(("a", 1, "step", '{"i": 0}', 2.25))
    (back,) = read_journal(HEADER + encode(pending)).entries
    assert back == pending
