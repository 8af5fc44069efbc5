"""What a run is handed as it is dispatched: the outputs of the roles it needs, each sealed by its digest.

The worker verifies each against its digest before the role's function runs
(``backends.worker``): that is where an output travelled, so that is where
it is checked. Each edge becomes a ``handoffs`` row once the run starts (a
dispatched role may still never start: fail-fast, an interrupt).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from parroles.backends.protocol import Handoff
from parroles.runner.tracked import TrackedRun


def handoffs_to(run: TrackedRun, runs: Sequence[TrackedRun]) -> tuple[Handoff, ...]:
    """Each completed need's output as recorded; the rows to record are kept in ``run.handed`` until it starts."""
    handoffs, now = [], time.time()
    for position in run.needs:
        upstream = runs[position]
        if upstream.output_json is None or upstream.output_digest is None:
            continue  # a need that did not complete (on_failed_needs="run"): in its failed_needs instead
        handoff = Handoff(upstream.name, str(uuid.uuid4()), upstream.output_json, upstream.output_digest,
                          upstream.output_kind)
        handoffs.append(handoff)
        run.handed.append((handoff.token_id, upstream.run_id, run.run_id, handoff.output_digest, now))
    return tuple(handoffs)
