"""Runs in the worker processes of a LocalCluster that parroles starts (a Dask preload).

Each worker leaves the terminal's process group as it starts, so a Ctrl-C
(which reaches every process of the foreground group) or a SIGTERM sent to
the group reaches only the parent: the parent cancels the roles through the
batch's cancel event and then closes the cluster itself, instead of every
worker dying noisily with its roles. A worker started by a nanny still dies
with it (Dask watches that), so leaving the group never leaves a process
behind. Its logs are quieted to errors for the same reason.

Each worker becomes a child subreaper before its first role, so what a role
starts stays under it wherever it moves (``dask.worker`` ends it), and
watches the parroles process that started the cluster (its pid comes in the
environment, ``PARENT_ENV``): after ``kill -9`` of that parent, the worker
kills everything under it and itself, as a loky worker does.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from parroles.backends import containment

PARENT_ENV = "PARROLES_DASK_PARENT"  # the pid of the parroles process that started this LocalCluster


def dask_setup(worker: Any) -> None:
    containment.become_subreaper()
    try:
        os.setpgrp()
    except OSError:  # already a group leader
        pass
    parent = os.environ.get(PARENT_ENV)
    if parent is not None and parent.isdigit():  # in its own group first: end_all kills the group it leads
        containment.watch_parent(int(parent))
    logging.getLogger("distributed").setLevel(logging.ERROR)


def dask_teardown(worker: Any) -> None:
    """The worker closes (its batch's cluster closes, or its parent died): nothing its roles started outlives it."""
    containment.end_descendants()
