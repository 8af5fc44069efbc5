"""Where a batch came from: the git commit of the working directory, recorded with each run.

``git rev-parse`` is a fork and an exec (a few ms, more from a large parent):
``git_sha_soon`` starts it on a thread of its own as the batch starts, and the
batch reads the answer when it writes its QUEUED rows.
"""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import Future

from parroles.backends import START_LOCK

GIT_TIMEOUT = 5.0  # seconds git may take to answer


def git_sha() -> str | None:
    """``HEAD`` of the git work tree around the working directory; None outside one (or without git)."""
    try:
        with START_LOCK:  # until git is exec'd (see START_LOCK), not while it runs
            git = subprocess.Popen(["git", "rev-parse", "HEAD"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True)
        with git:
            try:
                out, _ = git.communicate(timeout=GIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                git.kill()
                return None
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or None if git.returncode == 0 else None


def git_sha_soon() -> Future[str | None]:
    """``git_sha()``, looked up on a thread of its own (``answer`` reads it)."""
    future: Future[str | None] = Future()
    threading.Thread(target=lambda: future.set_result(git_sha()), name="parroles-git-sha", daemon=True).start()
    return future


def answer(lookup: Future[str | None]) -> str | None:
    """What ``git_sha_soon`` found; None if it has not found it within ``GIT_TIMEOUT`` (a process start that
    never ends holds ``START_LOCK``): a batch never waits on its provenance for long."""
    try:
        return lookup.result(timeout=GIT_TIMEOUT)
    except TimeoutError:
        return None
