"""A parent process for tests that signal or kill it: runs one batch and reports.

usage: python parent_script.py LEDGER BATCH_ID ROLES(comma) CONFIG_JSON [EXECUTOR]
EXECUTOR names a role executor of roles_for_tests (default crash_table).
Exits 0 on success, 130 on SIGINT, 143 on SIGTERM, 1 if every role failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import roles_for_tests as R

from parroles import BatchInterrupted, ParallelExecutionFailed, ParallelRoleConfig, execute_roles_parallel
from parroles.digests import content_digest


def main() -> None:
    # A background process inherits SIGINT as ignored; a terminal user's parroles would not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ledger, batch_id, roles, config = sys.argv[1], sys.argv[2], sys.argv[3].split(","), json.loads(sys.argv[4])
    executor = getattr(R, sys.argv[5]) if len(sys.argv) > 5 else R.crash_table
    try:
        results = execute_roles_parallel(ledger, batch_id, roles, content_digest(b"tests"),
                                         ParallelRoleConfig(**config), executor)
    except KeyboardInterrupt:
        sys.exit(130)
    except BatchInterrupted as exc:
        sys.exit(exc.exit_code)
    except ParallelExecutionFailed:
        sys.exit(1)
    print(json.dumps([r.status.value for r in results]))


if __name__ == "__main__":  # workers forked from a fork server import this module again, as __mp_main__
    main()
