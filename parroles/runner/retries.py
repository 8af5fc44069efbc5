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

import dataclasses
import random
from collections.abc import Sequence

from parroles.results import RETRY_REASONS as REASONS
from parroles.results import Reason

RETRY_TYPE = "parroles.Retry"  # the error type of a role that asked for another attempt


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    retries: int = 0  # attempts after the first
    delay: float = 1.0  # seconds before the second attempt
    backoff: float = 2.0  # each later delay is this many times the one before
    jitter: float = 0.1  # each delay is moved by up to this fraction, either way
    max_delay: float = 60.0
    on: tuple[str, ...] = ("crash", "timeout", "memory")


@dataclasses.dataclass(frozen=True)
class Failure:
    """What the book knows of an attempt that FAILED, to decide on the next."""

    reason: Reason | None
    error_types: Sequence[str] = ()  # its exception's class and bases, qualified and plain names
    exit_code: int | None = None  # a command role's program's
    asked_after: float | None = None  # it raised Retry(after=...): None if it did not ask, -1.0 if no delay given


def should_retry(policy: RetryPolicy, attempt: int, failure: Failure) -> bool:
    """Whether attempt number ``attempt``, which failed so, gets another."""
    if attempt > policy.retries:
        return False
    if failure.asked_after is not None:
        return True
    for wanted in policy.on:
        if wanted in REASONS:
            if REASONS[wanted] is not None and failure.reason is REASONS[wanted]:
                return True
        elif wanted.startswith("exit:"):
            if failure.exit_code is not None and failure.exit_code == int(wanted[5:]):
                return True
        elif failure.reason is Reason.ERROR and wanted in failure.error_types:
            return True
    return False


def delay_before(policy: RetryPolicy, attempt: int, failure: Failure, rng: random.Random) -> float:
    """Seconds to wait before attempt ``attempt + 1``: the role's own wish, else the backoff, jittered, capped."""
    if failure.asked_after is not None and failure.asked_after >= 0:
        return min(failure.asked_after, policy.max_delay)
    base = policy.delay * policy.backoff ** (attempt - 1)
    jittered = base * (1 + policy.jitter * rng.uniform(-1.0, 1.0))
    return max(0.0, min(jittered, policy.max_delay))
