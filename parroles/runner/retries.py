"""When a run that failed gets another attempt, and how long it waits for it (parent process only).

A role's policy is its batch's (``ParallelRoleConfig.retries``, ``retry_on``
and the delays), overridden per role (``Role(..., retries=, retry_on=)``).
``retry_on`` names what is worth another attempt: reasons (``crash``,
``timeout``, ``memory``, ``error``), exception types (``"ConnectionError"``,
matched on the class or any of its bases, by qualified or plain name) and, for
a command role, exit codes (``"exit:75"``). A role that raises
``parroles.Retry`` asks for another attempt whatever ``retry_on`` says. Never
retried: a run that was cancelled (fail-fast, a signal, upstream), and one
with no attempts left. Pure functions of their inputs: the jitter's random
source is passed in, so a schedule is testable without sleeping.
"""

from __future__ import annotations

import random

from parroles.results import Failure, RetryPolicy

RETRY_TYPE = "parroles.Retry"  # the error type of a role that asked for another attempt


def delay_before(policy: RetryPolicy, attempt: int, failure: Failure, rng: random.Random) -> float:
    """Seconds to wait before attempt ``attempt + 1``: the role's own wish, else the backoff, jittered, capped."""
    if failure.asked_after is not None and failure.asked_after >= 0:
        return min(failure.asked_after, policy.max_delay)
    try:
        base = policy.delay * policy.backoff ** (attempt - 1)
    except OverflowError:  # a backoff that outgrows every float: the cap says how long
        base = policy.max_delay
    jittered = base * (1 + policy.jitter * rng.uniform(-1.0, 1.0))
    return max(0.0, min(jittered, policy.max_delay))
