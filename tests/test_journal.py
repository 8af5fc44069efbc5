"""The journal in front of the ledger: nothing lost to a busy, full or damaged file, or to a signal."""

from __future__ import annotations

import contextlib
import enum
import hashlib
import marshal
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import journal_roles as J
import psutil
import pytest
import roles_for_tests as R
from conftest import SPEC_DIGEST
from waiting import WAIT, wait_until

from parroles import Ledger, LedgerError, ParallelRoleConfig, RunStatus, execute_roles_parallel
from parroles.errors import JournalDamagedWarning, LedgerPendingWarning
from parroles.ledger.journal import (
    HEADER,
    HEADER_V1,
    Journal,
    encode,
    frame,
    journal_paths,
    pending_records,
    read_journal,
)
from parroles.ledger.pending import NewRuns, Pending
from parroles.ledger.writer import LedgerWriter
from parroles.results import BatchState, Reason

HERE = Path(__file__).parent



@contextlib.contextmanager
def holder_after(ledger_path: Path, started: Path, gate: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that, once a role has started, opens the ledger read-only and keeps it (40 s at most)
    until the test lets go; it opens the gate the roles wait for once it holds the file."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, select, sys, time, duckdb
        deadline = time.monotonic() + 60
        while not pathlib.Path({str(started)!r}).exists():
            time.sleep(0.02)
        while True:  # the writer holds the file for a moment at a time
            try:
                con = duckdb.connect({str(ledger_path)!r}, read_only=True)
                break
            except duckdb.Error:
                if time.monotonic() > deadline:
                    sys.exit(1)
                time.sleep(0.01)
        pathlib.Path({str(gate)!r}).touch()
        select.select([sys.stdin], [], [], 40)  # until the test says so, 40 s at most
        con.close()
    """)], stdin=subprocess.PIPE, text=True)
    try:
        yield holder
    finally:
        with contextlib.suppress(OSError):
            holder.stdin.write("release\n")
            holder.stdin.close()
        try:
            holder.wait(timeout=WAIT)
        finally:
            if holder.poll() is None:
                holder.kill()


@pytest.fixture
def gates(tmp_path, monkeypatch) -> tuple[Path, Path]:
    started, gate = tmp_path / "started", tmp_path / "gate"
    monkeypatch.setenv("PARROLES_TEST_STARTED", str(started))
    monkeypatch.setenv("PARROLES_TEST_GATE", str(gate))
    return started, gate


def test_a_reader_holding_the_file_does_not_fail_the_batch(ledger_path, gates):
    """Held mid-batch, the ledger takes nothing; the call returns with a warning, and the next open applies all."""
    with Ledger(ledger_path):
        pass
    with holder_after(ledger_path, *gates) as holder:
        with pytest.warns(LedgerPendingWarning) as caught:
            results = execute_roles_parallel(ledger_path, "held", ["a", "b", "c", "d"], SPEC_DIGEST,
                                             ParallelRoleConfig(max_concurrent=4, ledger_wait=1.0), J.gated_events)
        assert holder.poll() is None, "the call must return while the reader still holds the file"
        assert [r.status for r in results] == [RunStatus.COMPLETED] * 4
        warning = caught[0].message
        assert warning.records > 0 and pending_records(str(ledger_path)) == warning.records
        # A reader meanwhile sees what is committed and says what is not.
        shown = subprocess.run([sys.executable, "-m", "parroles", "runs", "--batch", "held", "--ledger",
                                str(ledger_path)], capture_output=True, text=True, timeout=WAIT)
        assert shown.returncode == 0, shown.stderr
        assert f"{warning.records} record(s) of the ledger wait in its journal" in shown.stderr
        assert "COMPLETED" not in shown.stdout
    with Ledger(ledger_path) as ledger:  # the holder is gone: this open applies the journal
        runs = ledger.list_runs("held")
        assert [r.status for r in runs] == [RunStatus.COMPLETED] * 4
        assert [len(ledger.get_events(r.run_id)) for r in runs] == [J.EVENTS] * 4
        assert [r.summary.total_events for r in runs] == [J.EVENTS] * 4
        assert ledger.get_batch("held").state is BatchState.FINISHED
    assert journal_paths(str(ledger_path)) == []


def test_a_read_command_applies_a_journal_once_the_file_is_free(ledger_path, gates):
    with Ledger(ledger_path):
        pass
    with holder_after(ledger_path, *gates):
        with pytest.warns(LedgerPendingWarning):
            execute_roles_parallel(ledger_path, "later", ["a"], SPEC_DIGEST, ParallelRoleConfig(ledger_wait=0.5),
                                   J.gated_events)
    shown = subprocess.run([sys.executable, "-m", "parroles", "runs", "--batch", "later", "--ledger",
                            str(ledger_path)], capture_output=True, text=True, timeout=WAIT)
    assert shown.returncode == 0 and "COMPLETED" in shown.stdout and "journal" not in shown.stderr
    assert journal_paths(str(ledger_path)) == []


PARENT = """
import sys
sys.path.insert(0, {here!r})
import journal_roles as J
from parroles import ParallelRoleConfig, execute_roles_parallel
from parroles.digests import content_digest
execute_roles_parallel({ledger!r}, "killed", ["a", "b", "forever"], content_digest(b"tests"),
                       ParallelRoleConfig(max_concurrent=3), J.gated_events)
"""


def _journaled_statuses(ledger_path: Path) -> dict[str, str]:
    statuses: dict[str, str] = {}
    for path in journal_paths(str(ledger_path)):
        for entry in read_journal(Path(path).read_bytes()).entries:
            for run_id, columns in entry.run_updates.items():
                statuses[run_id] = columns.get("status", statuses.get(run_id, ""))
    return statuses


def test_kill_9_while_records_wait_for_a_busy_file_loses_nothing(ledger_path, gates):
    """Completed runs whose records were only journaled are COMPLETED after the parent dies, not orphaned."""
    with Ledger(ledger_path):
        pass
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(here=str(HERE), ledger=str(ledger_path))])
    try:
        with holder_after(ledger_path, *gates):
            wait_until(lambda: list(_journaled_statuses(ledger_path).values()).count("COMPLETED") == 2,
                       what="the two completed runs to reach the journal")
            family = [parent.pid] + [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
            parent.kill()
            parent.wait(timeout=WAIT)
            _, alive = psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)], timeout=10)
            assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if parent.poll() is None:
            parent.kill()
    with Ledger(ledger_path) as ledger:
        runs = {r.role: r for r in ledger.list_runs("killed")}
        assert runs["a"].status is RunStatus.COMPLETED and runs["b"].status is RunStatus.COMPLETED
        assert [len(ledger.get_events(runs[n].run_id)) for n in ("a", "b")] == [J.EVENTS, J.EVENTS]
        assert runs["forever"].status is RunStatus.FAILED and runs["forever"].reason is Reason.ORPHANED
        assert ledger.get_batch("killed").state is BatchState.CRASHED
    assert journal_paths(str(ledger_path)) == []


# -- the journal's own format ---------------------------------------------------------------


def _records(batch_id: str, n: int = 3) -> tuple[Pending, list[str]]:
    now = time.time()
    ids = [str(uuid.uuid4()) for _ in range(n)]
    pending = Pending()
    pending.batches[batch_id] = {"batch_id": batch_id, "name": None, "spec_digest": SPEC_DIGEST, "config": "{}",
                                 "state": "RUNNING", "started_at": now, "n_roles": n, "owner_host": "elsewhere",
                                 "owner_pid": 1, "owner_started": 0.0}
    pending.add_runs(NewRuns(ids, list(range(n)), ["r"] * n, batch_id, SPEC_DIGEST, None, now))
    for seq, run_id in enumerate(ids, 1):
        pending.run_updates[run_id] = {"status": "COMPLETED", "finished_at": now, "output": '"ok"',
                                       "total_events": 1, "success": True}
        pending.events.append((run_id, 1, "step", f'{{"n": {seq}}}', now))
    return pending, ids


def _journal_file(ledger_path: Path, *entries: Pending) -> Path:
    """A journal of ``entries`` left by a writer process that died (its lock went with it)."""
    writer = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        from parroles.ledger.journal import Journal
        journal = Journal({str(ledger_path)!r})
        assert journal.append(sys.stdin.buffer.read())  # entries are frames: one after another
        print(journal.path, flush=True)
        os._exit(0)  # no close: as a killed process leaves it
    """)], input=b"".join(encode(entry) for entry in entries), capture_output=True, timeout=WAIT, check=True)
    return Path(writer.stdout.decode().strip())


def test_a_torn_tail_is_ignored_and_the_whole_entries_are_applied(ledger_path):
    with Ledger(ledger_path):
        pass
    first, first_ids = _records("torn-1")
    second, _ = _records("torn-2")
    path = _journal_file(ledger_path, first)
    whole = path.read_bytes()
    path.write_bytes(whole + encode(second)[:-7])  # the second entry cut short, as by a crash
    contents = read_journal(path.read_bytes())
    assert contents.torn and len(contents.entries) == 1
    with Ledger(ledger_path) as ledger:
        assert [r.status for r in ledger.list_runs("torn-1")] == [RunStatus.COMPLETED] * 3
        assert [e.payload for e in ledger.get_events(first_ids[0])] == [{"n": 1}]
        assert ledger.list_runs("torn-2") == []
    assert not path.exists()


def test_applying_a_journal_twice_changes_nothing(ledger_path):
    """A journal whose records were committed just before its process died is harmless."""
    pending, ids = _records("twice")
    with Ledger(ledger_path):
        pass
    _journal_file(ledger_path, pending)
    with Ledger(ledger_path):
        pass  # applied once
    _journal_file(ledger_path, pending)
    with Ledger(ledger_path) as ledger:  # and again
        runs = ledger.list_runs("twice")
        assert [r.status for r in runs] == [RunStatus.COMPLETED] * 3
        assert sorted(r.run_id for r in runs) == sorted(ids)
        assert [len(ledger.get_events(run_id)) for run_id in ids] == [1, 1, 1]
        assert len(ledger.list_batches(batch_id="twice")) == 1


def test_a_live_writers_journal_is_never_applied_by_another_open(ledger_path):
    pending, _ = _records("live")
    with Ledger(ledger_path):
        pass
    journal = Journal(str(ledger_path))
    try:
        assert journal.append(encode(pending))
        with Ledger(ledger_path) as ledger:  # the journal is locked by its (live) writer
            assert ledger.list_runs("live") == []
        assert Path(journal.path).exists()
    finally:
        journal.close()


def test_a_committed_batch_leaves_no_journal(run_batch, ledger_path):
    run_batch(["a", "b"], R.echo)
    assert journal_paths(str(ledger_path)) == []


# -- a full disk, a read-only file system, a damaged file --------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs (skipped only where this process may not mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


@pytest.fixture
def disk_env(small_disk, tmp_path, monkeypatch) -> Path:
    done = tmp_path / "done"
    done.mkdir()
    monkeypatch.setenv("PARROLES_TEST_DISK", str(small_disk))
    monkeypatch.setenv("PARROLES_TEST_DONE", str(done))
    return done


def _no_thread_died(capfd) -> None:
    err = capfd.readouterr().err
    assert "Exception in thread" not in err and "Traceback" not in err, err


def test_a_full_disk_that_frees_up_loses_nothing(small_disk, disk_env, capfd):
    ledger_path = small_disk / "ledger.duckdb"
    results = execute_roles_parallel(ledger_path, "full", ["fill", "noisy", "free", "after"], SPEC_DIGEST,
                                     ParallelRoleConfig(max_concurrent=1), J.disk_roles)
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 4
    with Ledger(ledger_path) as ledger:
        noisy = ledger.list_runs("full")[1]
        assert noisy.status is RunStatus.COMPLETED and len(ledger.get_events(noisy.run_id)) == 100
    _no_thread_died(capfd)


def test_a_disk_that_stays_full_is_an_error_naming_its_cause(small_disk, disk_env, capfd):
    ledger_path = small_disk / "ledger.duckdb"
    with pytest.raises(LedgerError, match="No space left on device") as raised:
        execute_roles_parallel(ledger_path, "full", ["fill", "noisy"], SPEC_DIGEST,
                               ParallelRoleConfig(max_concurrent=1, ledger_wait=1.0), J.disk_roles)
    assert sorted(p.name for p in disk_env.iterdir()) == ["fill", "noisy"]  # every role ran to its end first
    assert isinstance(raised.value.__cause__, OSError)
    assert "neither committed" in str(raised.value)
    assert not [t for t in threading.enumerate() if t.name == "parroles-ledger-writer"]
    _no_thread_died(capfd)


def test_a_read_only_file_system_keeps_the_real_error(small_disk):
    ledger_path = small_disk / "ledger.duckdb"
    with Ledger(ledger_path):
        pass
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=30)
    with pytest.raises(LedgerError) as raised:
        execute_roles_parallel(ledger_path, "ro", ["a"], SPEC_DIGEST, ParallelRoleConfig(ledger_wait=0.5), R.echo)
    assert "Read-only file system" in str(raised.value)
    assert "rollback" not in str(raised.value)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_ledger_this_process_left_intact_is_not_read_again_and_any_change_since_is(ledger_path, monkeypatch):
    from parroles.ledger import integrity

    reads = []
    real = integrity.bytes_needed
    monkeypatch.setattr(integrity, "bytes_needed", lambda con, path: reads.append(path) or real(con, path))
    for _ in range(3):  # the first open checks the file; the next ones find it as this process left it
        execute_roles_parallel(ledger_path, f"b-{uuid.uuid4().hex}", ["a"], SPEC_DIGEST, None, R.echo)
    assert len(reads) == 1
    with ledger_path.open("ab") as file:  # anyone's change since, even one that damages nothing, is read again
        file.write(b"\0" * 4096)
    execute_roles_parallel(ledger_path, f"b-{uuid.uuid4().hex}", ["a"], SPEC_DIGEST, None, R.echo)
    assert len(reads) == 2


def test_a_ledger_damaged_while_this_process_holds_it_is_checked_again_at_its_next_open(ledger_path, monkeypatch):
    """A breaker's case (issue 26): the file is cut short by another hand while this process has it open; the
    error DuckDB meets then makes the next open check the file again, which refuses it."""
    from parroles.ledger import db as ledger_db

    _a_big_ledger(ledger_path)
    execute_roles_parallel(ledger_path, "first", ["a"], SPEC_DIGEST, None, R.echo)  # checked, then left intact
    real_attach = ledger_db._Attachments.attach

    def attach_then_cut(self, path, read_only):
        con = real_attach(self, path, read_only)
        monkeypatch.setattr(ledger_db._Attachments, "attach", real_attach)  # once
        os.truncate(path, os.path.getsize(path) // 2)
        return con

    monkeypatch.setattr(ledger_db._Attachments, "attach", attach_then_cut)
    with pytest.raises(LedgerError):
        execute_roles_parallel(ledger_path, "cut", ["a"], SPEC_DIGEST, ParallelRoleConfig(ledger_wait=1), R.echo)
    before = _sha(ledger_path)
    with pytest.raises(LedgerError, match=r"is damaged \(the file has"):  # the test's folder is named "damaged"
        execute_roles_parallel(ledger_path, "after", ["a"], SPEC_DIGEST, None, R.echo)
    assert _sha(ledger_path) == before


def _a_big_ledger(ledger_path: Path) -> None:
    """A ledger of many blocks (a cut through its middle loses some of its tables' data)."""
    writer = LedgerWriter(str(ledger_path))
    writer.open()
    pending, _ = _records("big", n=3000)
    writer.start_batch(pending.batches["big"], pending.new_runs[0])
    for n in range(20_000):
        writer.add_event(pending.new_runs[0].run_ids[n % 3000], "step", '{"padding": "%s"}' % ("z" * 40), 0.0)
    writer.close()


def test_a_damaged_ledger_is_refused_for_writing_and_left_byte_identical(ledger_path, tmp_path):
    _a_big_ledger(ledger_path)
    os.truncate(ledger_path, ledger_path.stat().st_size // 2)
    before = _sha(ledger_path)
    with pytest.raises(LedgerError, match=r"is damaged \(the file has"):
        Ledger(ledger_path)
    done = subprocess.run([sys.executable, "-m", "parroles", "run", str(HERE.parent / "examples" / "quickstart.toml"),
                           "--ledger", str(ledger_path)], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "is damaged (the file has" in done.stderr
    assert _sha(ledger_path) == before
    assert not Path(f"{ledger_path}.wal").exists() and journal_paths(str(ledger_path)) == []


# -- signals at any moment ---------------------------------------------------------------------------

SIGNAL_ROLES = '''
import time
import parroles

def work(seconds: float = 1.0) -> str:
    ctx = parroles.context()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(20_000))
        ctx.check_cancelled()
    return "done"
'''
SIGNAL_SPEC = """
[batch]
max_concurrent = 2
cancel_grace = 1
""" + "".join(f'\n[[roles]]\nname = "r{i}"\ncall = "sigroles:work"\n' for i in range(3))
OFFSETS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_any_moment_ends_cleanly(tmp_path, signum):
    (tmp_path / "sigroles.py").write_text(SIGNAL_ROLES)
    (tmp_path / "sig.toml").write_text(SIGNAL_SPEC)
    code = 128 + signum
    for offset in OFFSETS:
        ledger_path = tmp_path / f"ledger-{offset}.duckdb"
        # A session of its own, signalled as a whole: what a terminal's Ctrl-C does.
        proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(tmp_path / "sig.toml"), "--ledger",
                                 str(ledger_path), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        time.sleep(offset)
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=WAIT)
        for native in ("terminate called", "FATAL", "Aborted", "core dumped"):
            assert native not in err, f"at {offset} s: {err}"
        if not ledger_path.exists():
            # Before parroles' code runs, the interpreter's own handling applies (see the README).
            assert proc.returncode in (code, -signum, 1), f"at {offset} s: rc {proc.returncode}: {err}"
            continue
        assert proc.returncode in (code, 0), f"at {offset} s: rc {proc.returncode}: {err}"
        with Ledger(ledger_path, read_only=True) as ledger:  # a valid ledger, every run ended
            runs = ledger.list_runs()
            assert all(r.status.terminal for r in runs), f"at {offset} s: {[r.status for r in runs]}"
            assert all(b.state is not BatchState.RUNNING for b in ledger.list_batches())


GATED_MODULE = '''
import os, pathlib, time
import parroles

def gated() -> int:
    pathlib.Path(os.environ["PARROLES_TEST_STARTED"]).touch()
    deadline = time.monotonic() + 60
    while not pathlib.Path(os.environ["PARROLES_TEST_GATE"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    for i in range(5):
        parroles.context().emit("step", {"i": i})
    return 5
'''


def test_parroles_run_on_a_busy_ledger_warns_on_one_line_and_keeps_its_exit_code(tmp_path, ledger_path, gates):
    (tmp_path / "gated.py").write_text(GATED_MODULE)
    spec = tmp_path / "busy.toml"
    spec.write_text('[batch]\nledger_wait = 30\n\n[[roles]]\nname = "a"\ncall = "gated:gated"\n')
    with Ledger(ledger_path):
        pass
    with holder_after(ledger_path, *gates):
        done = subprocess.run([sys.executable, "-m", "parroles", "run", str(spec), "--ledger", str(ledger_path),
                               "--ledger-wait", "0.5", "--quiet"], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if line.startswith("parroles: warning:")]
    assert len(warning) == 1 and "wait in the journal" in warning[0], done.stderr
    assert "COMPLETED" in done.stdout
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.list_runs()
        assert run.status is RunStatus.COMPLETED and len(ledger.get_events(run.run_id)) == 5


# -- found by trying to break it ----------------------------------------------------------------------


class Who(enum.StrEnum):
    ALICE = "alice"


def test_role_names_of_a_str_subclass_are_recorded(run_batch, ledger_path):
    """A StrEnum role (not an AgentRole) is stored as its plain string; it once made the journal drop a batch."""
    results, batch_id = run_batch([Who.ALICE, "plain"], R.echo)
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 2
    with Ledger(ledger_path) as ledger:
        assert [r.role for r in ledger.list_runs(batch_id)] == ["alice", "plain"]


def test_records_the_journal_cannot_encode_are_committed_not_dropped(ledger_path):
    writer = LedgerWriter(str(ledger_path))
    writer.open()
    pending, ids = _records("odd", n=1)
    odd_name = NewRuns(ids, [0], [Who.ALICE], "odd", SPEC_DIGEST, None, time.time())  # marshal refuses it
    writer.start_batch(pending.batches["odd"], odd_name)
    assert writer.flush(wait=30) == 0
    writer.close()
    with Ledger(ledger_path) as ledger:
        assert [r.role for r in ledger.list_runs("odd")] == ["alice"]


def _raw_journal(ledger_path: Path, data: bytes) -> Path:
    path = Path(f"{ledger_path}.0123456789ab.journal")
    path.write_bytes(data)
    return path


def test_a_journal_of_another_version_stops_the_open_and_is_kept(ledger_path):
    with Ledger(ledger_path):
        pass
    pending, _ = _records("future")
    path = _raw_journal(ledger_path, b"PARROLES-JOURNAL 3\n" + encode(pending))
    with pytest.raises(LedgerError, match="not a journal this parroles reads"):
        Ledger(ledger_path)
    assert path.exists()
    shown = subprocess.run([sys.executable, "-m", "parroles", "run", str(HERE.parent / "examples" / "quickstart.toml"),
                            "--ledger", str(ledger_path)], capture_output=True, text=True, timeout=WAIT)
    assert shown.returncode == 3 and "not a journal this parroles reads" in shown.stderr
    assert path.exists()


def test_a_journal_damaged_in_its_middle_is_applied_up_to_the_damage_and_kept_aside(ledger_path):
    with Ledger(ledger_path):
        pass
    first, first_ids = _records("before-damage")
    second, _ = _records("after-damage")
    damaged = bytearray(encode(first) + encode(second))
    damaged[20] ^= 0xFF  # inside the first entry: the second, whole, follows the damage
    third, _ = _records("last")
    path = _raw_journal(ledger_path, HEADER + encode(first) + bytes(damaged) + encode(third))
    with pytest.warns(JournalDamagedWarning, match="damaged after byte"):
        ledger = Ledger(ledger_path)
    with ledger:
        assert [r.status for r in ledger.list_runs("before-damage")] == [RunStatus.COMPLETED] * 3
        assert ledger.list_runs("last") == []  # after the damage: not guessed at
    assert not path.exists() and Path(f"{path}.damaged").read_bytes().startswith(HEADER)
    shown = subprocess.run([sys.executable, "-m", "parroles", "runs", "--ledger", str(ledger_path)],
                           capture_output=True, text=True, timeout=WAIT)
    assert shown.returncode == 0 and "warning" not in shown.stderr  # applied once, never again


@pytest.mark.parametrize("payload", [marshal.dumps({"not": "an entry"}), b"\x00\x01 not marshal", marshal.dumps([1])])
def test_an_entry_whose_checksum_matches_but_is_no_entry_is_damage_not_a_crash(ledger_path, payload):
    with Ledger(ledger_path):
        pass
    first, _ = _records("whole")
    _raw_journal(ledger_path, HEADER + encode(first) + frame(payload))
    shown = subprocess.run([sys.executable, "-m", "parroles", "runs", "--ledger", str(ledger_path)],
                           capture_output=True, text=True, timeout=WAIT)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "parroles: warning: the journal" in shown.stderr and shown.stdout.count("COMPLETED") == 3


def test_a_journal_that_outlived_its_ledger_adds_no_events_of_unknown_runs(ledger_path):
    pending, _ = _records("gone")
    later = Pending(run_updates=pending.run_updates, events=pending.events)  # its batch's insert was committed
    with Ledger(ledger_path):
        pass
    _journal_file(ledger_path, later)
    with Ledger(ledger_path) as ledger:
        assert ledger.query("SELECT count(*) FROM events") == [(0,)]
        assert ledger.query("SELECT count(*) FROM runs") == [(0,)]


def test_ctrl_c_while_the_file_is_busy_exits_130_at_once(tmp_path, ledger_path):
    """At the start (the file held before the batch) and during the last commit's wait alike."""
    (tmp_path / "gated.py").write_text(GATED_MODULE)
    spec = tmp_path / "busy.toml"
    spec.write_text('[[roles]]\nname = "a"\ncall = "gated:gated"\n')
    with Ledger(ledger_path):
        pass
    started, gate = tmp_path / "started", tmp_path / "gate"
    started.touch()  # the holder takes the file at once: before the batch can start
    env = os.environ | {"PARROLES_TEST_STARTED": str(tmp_path / "s2"), "PARROLES_TEST_GATE": str(gate)}
    with holder_after(ledger_path, started, gate) as holder:
        wait_until(gate.exists, what="the holder to hold the file")
        proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(spec), "--ledger", str(ledger_path),
                                 "--ledger-wait", "600"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        time.sleep(1.0)  # well into its wait for the file
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)  # a wait of 600 s would fail here, not hang
        assert proc.returncode == 130, err
        assert holder.poll() is None
    with Ledger(ledger_path) as ledger:
        assert ledger.list_batches() == []  # nothing was written


def test_ctrl_c_during_the_last_commits_wait_leaves_the_records_journaled(tmp_path, ledger_path, gates):
    (tmp_path / "gated.py").write_text(GATED_MODULE)
    spec = tmp_path / "busy.toml"
    spec.write_text('[[roles]]\nname = "a"\ncall = "gated:gated"\n')
    with Ledger(ledger_path):
        pass
    with holder_after(ledger_path, *gates) as holder:
        proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(spec), "--ledger", str(ledger_path),
                                 "--ledger-wait", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        wait_until(lambda: "COMPLETED" in _journaled_statuses(ledger_path).values(), what="the role's end journaled")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 130, err
        assert holder.poll() is None
        assert "COMPLETED" in out  # the summary says how the batch ended
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.list_runs()
        assert run.status is RunStatus.COMPLETED and len(ledger.get_events(run.run_id)) == 5


def test_a_signal_inside_the_writer_threads_start_leaves_no_writer_running(ledger_path, monkeypatch):
    # Ctrl-C can land inside Thread.start(), after the thread exists but before it says so: the writer must
    # still be stopped and joined, never left to create the file while the interpreter exits under it.
    import _thread
    import threading

    original = threading.Thread.start

    def interrupted_start(self):
        if self.name != "parroles-ledger-writer":
            return original(self)
        gate, bootstrap = threading.Event(), self._bootstrap
        threading._limbo[self] = self  # as Thread.start() does before the new thread runs
        _thread.start_new_thread(lambda: (gate.wait(), bootstrap()), ())
        threading.Timer(0.2, gate.set).start()
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    with pytest.raises(KeyboardInterrupt):
        Ledger(ledger_path)
    monkeypatch.undo()
    assert [t for t in threading.enumerate() if t.name == "parroles-ledger-writer"] == []
    if ledger_path.exists():  # absent, or a whole ledger
        with Ledger(ledger_path, read_only=True) as ledger:
            assert ledger.list_batches() == []


# -- damage is never taken for a torn tail, and a ledger reads only its own journals -------


def _entries(*batch_ids: str) -> tuple[list[bytes], list[list[str]]]:
    made = [_records(batch_id) for batch_id in batch_ids]
    return [encode(pending) for pending, _ in made], [ids for _, ids in made]


def _flip(entry: bytes, at: int) -> bytes:
    damaged = bytearray(entry)
    damaged[at] ^= 0x10
    return bytes(damaged)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("field", ["length", "payload crc", "payload"])
def test_one_flipped_bit_anywhere_is_damage_kept_aside_with_a_warning(ledger_path, where, field):
    """Issue 20 items 2 and 3: never a torn tail, never silently dropped, whatever the entry or the field."""
    with Ledger(ledger_path):
        pass
    entries, _ = _entries("e0", "e1", "e2")
    index = {"first": 0, "middle": 1, "last": 2}[where]
    entries[index] = _flip(entries[index], {"length": 1, "payload crc": 5, "payload": 20}[field])
    path = _raw_journal(ledger_path, HEADER + b"".join(entries))
    contents = read_journal(path.read_bytes())
    assert not contents.torn and contents.damaged_at == len(HEADER) + sum(map(len, entries[:index]))
    with pytest.warns(JournalDamagedWarning, match="damaged after byte"):
        ledger = Ledger(ledger_path)
    with ledger:
        applied = [bool(ledger.list_runs(f"e{i}")) for i in range(3)]
    assert applied == [i < index for i in range(3)]
    assert not path.exists() and Path(f"{path}.damaged").exists()


@pytest.mark.parametrize("tail", [bytes(1), bytes(12), bytes(8192)])
def test_a_zero_filled_tail_is_a_torn_tail_not_damage(ledger_path, tail, recwarn):
    """Issue 20 item 4: zeros are what a crash while the file grew leaves; nothing is lost, nothing said."""
    with Ledger(ledger_path):
        pass
    entries, _ = _entries("z0", "z1")
    path = _raw_journal(ledger_path, HEADER + b"".join(entries) + tail)
    assert read_journal(path.read_bytes()).torn
    with Ledger(ledger_path) as ledger:
        assert [len(ledger.list_runs(f"z{i}")) for i in range(2)] == [3, 3]
    assert not path.exists() and not Path(f"{path}.damaged").exists()
    assert not [w for w in recwarn if issubclass(w.category, JournalDamagedWarning)]


def test_zeros_with_anything_after_them_are_damage(ledger_path):
    entries, _ = _entries("y0", "y1")
    contents = read_journal(HEADER + entries[0] + bytes(16) + entries[1])
    assert contents.damaged_at == len(HEADER) + len(entries[0]) and len(contents.entries) == 1


def test_a_journal_of_the_first_format_is_still_applied(ledger_path):
    """Version 1 (a frame of length and payload checksum) was written by parroles before this format."""
    with Ledger(ledger_path):
        pass
    pending, ids = _records("v1")
    payload = marshal.dumps(pending.to_plain(), 4)
    path = _raw_journal(ledger_path, HEADER_V1 + struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    with Ledger(ledger_path) as ledger:
        assert sorted(r.run_id for r in ledger.list_runs("v1")) == sorted(ids)
    assert not path.exists()


def test_a_ledger_applies_only_its_own_journals(tmp_path):
    """Issue 20 item 1: ``led`` beside ``led.duckdb`` and ``led.duckdb.bak`` (a glob's ``*`` matches dots)."""
    names = ["led", "led.duckdb", "led.duckdb.bak", "le[d]?*"]
    journals = {}
    for name in names:
        path = tmp_path / name
        with Ledger(path):
            pass
        pending, _ = _records(f"batch of {name}")
        journals[name] = _raw_journal(path, HEADER + encode(pending))
    for name in names:
        assert journal_paths(str(tmp_path / name)) == [str(journals[name])]
    for name in names:
        with Ledger(tmp_path / name) as ledger:
            assert [b.batch_id for b in ledger.list_batches()] == [f"batch of {name}"]
        assert not journals[name].exists()


def test_a_ledger_through_a_symlink_and_its_target_share_their_journals(tmp_path):
    """Found by breaking issue 20: a batch run through a link left a journal its target's opens never saw."""
    real, link = tmp_path / "real.duckdb", tmp_path / "link.duckdb"
    with Ledger(real):
        pass
    link.symlink_to(real)
    pending, ids = _records("through-a-link")
    made = _journal_file(link, pending)
    assert made.name.startswith("real.duckdb.") and journal_paths(str(link)) == journal_paths(str(real)) == [str(made)]
    with Ledger(real) as ledger:
        assert sorted(r.run_id for r in ledger.list_runs("through-a-link")) == sorted(ids)
        assert {r.status for r in ledger.list_runs("through-a-link")} == {RunStatus.COMPLETED}
    assert not made.exists()
