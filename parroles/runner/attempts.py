"""A retry's next attempt: a run of its own, recorded QUEUED with ``attempt`` + 1 and ``retry_of``.

Nothing is overwritten: the attempt that failed keeps its row, events, logs
and error; the next one is a new run of the same role, born BACKING_OFF
(``runner.lifecycle``) with the time it may start, on the loop's clock.
"""

from __future__ import annotations

import dataclasses
import random
import time

from parroles.ledger.pending import NewRuns
from parroles.results import Failure, should_retry
from parroles.runner.lifecycle import RunState
from parroles.runner.retries import delay_before
from parroles.runner.tracked import TrackedRun, new_run_ids


def attempt_after(run: TrackedRun, failure: Failure, now: float, rng: random.Random,
                  memory_growth: float = 1.0) -> TrackedRun | None:
    """The next attempt of a run that failed so, if its policy gives it one (after its delay); else None."""
    if not should_retry(run.policy, run.number, failure):
        return None
    return next_attempt(run, delay_before(run.policy, run.number, failure, rng), now, memory_growth)


def next_attempt(run: TrackedRun, delay: float, now: float, memory_growth: float = 1.0) -> TrackedRun:
    """The attempt after ``run``, which may start ``delay`` seconds after ``now`` (with its memory_limit grown)."""
    limit = int(run.memory_limit * memory_growth) if run.memory_limit is not None else None
    return TrackedRun(run.position, run.role, run.name, new_run_ids(1)[0], run.timeout, needs=run.needs,
                      runs_after_failed_needs=run.runs_after_failed_needs, state=RunState.BACKING_OFF,
                      number=run.number + 1, retry_of=run.run_id, retry_at=now + delay, policy=run.policy,
                      params_json=run.params_json, matrix_of=run.matrix_of, failed_needs=dict(run.failed_needs),
                      key=run.key, threads=run.threads, memory_limit=limit)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What every run of a batch is recorded with."""

    batch_id: str
    spec_digest: str | None
    git_sha: str | None


def attempt_rows(run: TrackedRun, provenance: Provenance) -> NewRuns:
    """The QUEUED row of a next attempt (ready once its delay is over: its ``ready_at`` comes then)."""
    return NewRuns([run.run_id], [run.position], [run.name], provenance.batch_id, provenance.spec_digest,
                   provenance.git_sha, time.time(), params=[run.params_json] if run.params_json else None,
                   matrix_of=[run.matrix_of] if run.matrix_of else None, waiting=[True], attempts=[run.number],
                   retry_of=[run.retry_of])
