"""Roles that fork a child which outlives its loky worker, then kill the worker (issue 22; run in workers)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import Any

from roles_for_tests import _wait_until, crash_table


def _forked_child(note: str, channel_fd: int) -> None:
    """Forked from a worker: notes its pid and what its copy of the worker's channel is, then outlives the worker."""
    try:
        seen = os.readlink(f"/proc/self/fd/{channel_fd}")
    except OSError as exc:
        seen = f"closed ({exc.strerror})"
    with open(note + ".tmp", "w") as out:
        json.dump({"pid": os.getpid(), "channel": seen}, out)
    os.rename(note + ".tmp", note)
    time.sleep(300)


class ForkThenDie:
    """'fork-os-X' / 'fork-mp-X' forks a child (os.fork / multiprocessing's fork context) that outlives the
    worker, waits until the child has written its note ('child-of-NAME' in ``directory``), then dies as
    crash_table's X; every role marks its start, and any other role returns its worker's pid."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, role: Any, run_id: str) -> Any:
        from parroles.backends.loky import worker

        name = str(role)
        with open(os.path.join(self.directory, f"start-{name}-{time.time_ns()}"), "x"):
            pass
        if not name.startswith("fork-"):
            return os.getpid()
        _, how, death = name.split("-", 2)
        note, channel_fd = os.path.join(self.directory, f"child-of-{name}"), worker._channel_fd
        assert channel_fd is not None, "not a loky worker on the channel"
        if how == "os":
            if os.fork() == 0:
                try:
                    _forked_child(note, channel_fd)
                finally:
                    os._exit(0)
        else:
            multiprocessing.get_context("fork").Process(target=_forked_child, args=(note, channel_fd)).start()
        _wait_until(lambda: os.path.exists(note), "the forked child's note")
        return crash_table(death, run_id)
