"""Imported by multiprocessing's fork server alone (its preload list): set up once, forked many times.

It imports parroles' worker code, so that a forked worker costs a fork, not
its imports. And it puts back what each forked child starts with: parroles
starts the fork server with SIGINT and SIGTERM blocked
(``lifeline.hold_group_signals``), so that a signal sent to the caller's
whole process group cannot kill it and lose every running role with it. The
server is shared by the whole process, so it also forks the caller's own
``forkserver`` processes: those must start with the signals as any process
does, or ``terminate()`` could not end them. (A parroles worker is unblocked
from its fork on; it leaves the caller's group in ``init_worker``.)
"""

from __future__ import annotations

import gc
import os

from parroles.backends.loky import worker  # noqa: F401 - preloaded for every worker the server forks
from parroles.backends.loky.lifeline import unblock_group_signals

os.register_at_fork(after_in_child=unblock_group_signals)

# The fork server's heap is now what every worker it forks starts with: frozen, the workers' collections skip
# it (their pages stay shared, as Python's docs advise for a process that forks without exec) and so do the
# server's own at exit.
gc.freeze()
