"""Runs in the worker processes of a LocalCluster that parroles starts (a Dask preload).

Each worker leaves the terminal's process group as it starts, so a Ctrl-C
(which reaches every process of the foreground group) or a SIGTERM sent to
the group reaches only the parent: the parent cancels the roles through the
batch's cancel event and then closes the cluster itself, instead of every
worker dying noisily with its roles. A worker started by a nanny still dies
with it (Dask watches that), so leaving the group never leaves a process
behind. Its logs are quieted to errors for the same reason.

Each worker becomes a child subreaper before its first role, so what a role
starts stays under it wherever it moves (``dask.worker`` ends it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from parroles.backends import containment


def dask_setup(worker: Any) -> None:
    containment.become_subreaper()
    try:
        os.setpgrp()
    except OSError:  # already a group leader
        pass
    logging.getLogger("distributed").setLevel(logging.ERROR)
