"""Captured output: what each role prints lands in its own run, in order, bounded; never in another role's run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from waiting import wait_until

import parroles
from parroles import Ledger, Role, RunStatus


def every_way() -> str:
    print("print to stdout", flush=True)
    print("print to stderr", file=sys.stderr, flush=True)
    logging.getLogger("parroles-test").warning("a logging warning")
    os.write(1, b"os.write to fd 1\n")
    subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
    return "done"


def many_lines(count: int, tag: str) -> int:
    for i in range(count):
        print(f"{tag} {i}")
    return count


def flood(megabytes: int) -> str:
    line = "x" * 1023
    for _ in range(megabytes * 1024):
        print(line)
    return "survived"


def leave_a_writer_behind() -> str:
    """A child that keeps writing after the role returned: none of it may land in a later role's run."""
    subprocess.Popen([sys.executable, "-c",
                      "import time\nfor i in range(40):\n    print('leftover', i, flush=True); time.sleep(0.05)"])
    return "returned"


def test_every_way_of_writing_lands_in_its_run_and_stream(ledger_path):
    batch = parroles.run([Role("writer", every_way), Role("other", many_lines, params={"count": 3, "tag": "other"})],
                         ledger=ledger_path, max_concurrent=2)
    assert batch.ok
    with Ledger(ledger_path) as ledger:
        lines = ledger.get_logs(batch.by_role["writer"].run_id)
        other = ledger.get_logs(batch.by_role["other"].run_id)
    by_text = {line.line: line.stream for line in lines}
    assert by_text == {"print to stdout": "stdout", "print to stderr": "stderr", "a logging warning": "stderr",
                       "os.write to fd 1": "stdout", "from a child process": "stdout"}
    assert [line.seq for line in lines] == list(range(1, 6))
    assert [line.line for line in other] == ["other 0", "other 1", "other 2"]  # nothing of the writer's


def test_a_hundred_thousand_lines_are_all_stored_in_order(ledger_path):
    batch = parroles.run([Role("many", many_lines, params={"count": 100_000, "tag": "line"})], ledger=ledger_path)
    with Ledger(ledger_path) as ledger:
        (count, ordered) = ledger.query(
            "SELECT count(*), bool_and(line = 'line ' || (seq - 1)) FROM logs WHERE run_id = ?::UUID",
            [batch[0].run_id])[0]
    assert batch.ok and count == 100_000 and ordered


def test_a_flood_is_capped_with_a_marker_and_the_run_completes(ledger_path):
    batch = parroles.run([Role("flood", flood, params={"megabytes": 20})], ledger=ledger_path,
                         max_log_bytes=1024 * 1024)
    assert batch[0].status is RunStatus.COMPLETED and batch[0].output == "survived"
    with Ledger(ledger_path) as ledger:
        lines = ledger.get_logs(batch[0].run_id)
        tail = ledger.get_logs(batch[0].run_id, tail=1)
    assert len(lines) == 1024 + 1  # what fits in 1 MiB, then the marker
    assert tail[0].line.startswith("[parroles: ") and "dropped past the limit of 1048576 bytes" in tail[0].line


def one_long_line(megabytes: int) -> str:
    os.write(1, b"x" * (megabytes * 1024 * 1024))  # no newline, ever
    return "done"


def test_the_caps_marker_counts_a_long_line_as_one_line_and_its_bytes_exactly(ledger_path):
    """Issue 20 item 12: a 5 MiB line without a newline is one line dropped, not 320."""
    batch = parroles.run([Role("long", one_long_line, params={"megabytes": 5})], ledger=ledger_path,
                         max_log_bytes=1024 * 1024)
    with Ledger(ledger_path) as ledger:
        *kept, marker = ledger.get_logs(batch[0].run_id)
    assert batch.ok and {line.line for line in kept} == {"x" * 16_384}
    dropped = 5 * 1024 * 1024 - len(kept) * 16_384
    assert marker.line == f"[parroles: {dropped} bytes in 1 line dropped past the limit of 1048576 bytes]"


def test_a_leftover_writer_never_lands_in_a_later_role(ledger_path):
    batch = parroles.run([Role("leaver", leave_a_writer_behind),
                          Role("next", many_lines, params={"count": 2, "tag": "mine"}, needs=["leaver"])],
                         ledger=ledger_path, max_concurrent=1)
    assert batch.ok
    with Ledger(ledger_path) as ledger:
        assert [line.line for line in ledger.get_logs(batch.by_role["next"].run_id)] == ["mine 0", "mine 1"]


def speak_and_tell_the_pipe(index: int) -> list[int]:
    """Lines of its own (the last unflushed, without a newline) on every other role; where its fd 1 leads."""
    if index % 2:
        print(f"role {index} line 1")
        os.write(2, f"role {index} raw\n".encode())
        sys.stdout.write(f"role {index} unfinished")
    return [os.getpid(), os.fstat(1).st_ino]


def test_a_workers_pipes_serve_role_after_role_and_each_gets_only_its_lines(ledger_path):
    """Issue 26: a worker's capture is set up once; each role's lines, to its last unflushed byte, are its own.

    The pipes change only after a role that leaves a process behind (which may write on)."""
    roles = [Role(f"r{i}", speak_and_tell_the_pipe, params={"index": i}, needs=[f"r{i - 1}"] if i else [])
             for i in range(8)]
    roles += [Role("leaver", leave_a_writer_behind, needs=["r7"]),
              Role("after", speak_and_tell_the_pipe, params={"index": 9}, needs=["leaver"])]
    batch = parroles.run(roles, ledger=ledger_path, max_concurrent=1)
    assert batch.ok
    with Ledger(ledger_path) as ledger:
        for result in batch:
            if result.role == "leaver":
                continue
            index = int(result.role[1:]) if result.role != "after" else 9
            expected = [f"role {index} line 1", f"role {index} raw", f"role {index} unfinished"] if index % 2 else []
            assert sorted(line.line for line in ledger.get_logs(result.run_id)) == sorted(expected), result.role
    pipes = {tuple(result.output) for result in batch if result.role.startswith("r")}
    assert len(pipes) == 1, pipes  # one worker, one stdout pipe for all eight roles
    assert tuple(batch.by_role["after"].output) not in pipes  # the leaver's pipes retired with it


def close_stdout() -> None:
    print("before closing")
    sys.stdout.close()


def swap_streams_and_leave_them() -> None:
    import io

    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    print("into a StringIO, not the run's log")


def drop_streams() -> None:
    sys.stdout, sys.stderr = None, object()  # type: ignore[assignment]


def say(index: int) -> None:
    print(f"role {index} out")
    print(f"role {index} err", file=sys.stderr)


def test_a_role_that_closes_or_swaps_its_streams_does_not_silence_the_roles_after_it(ledger_path):
    """Found by breakers (issue 26): later roles on the worker printed into a closed or foreign stream, or failed."""
    breakers = [close_stdout, swap_streams_and_leave_them, drop_streams]
    roles = []
    for index, breaker in enumerate(breakers):
        roles += [Role(breaker.__name__, breaker, needs=[f"after-{index - 1}"] if index else []),
                  Role(f"after-{index}", say, params={"index": index}, needs=[breaker.__name__])]
    batch = parroles.run(roles, ledger=ledger_path, max_concurrent=1)
    assert batch.ok, batch
    with Ledger(ledger_path) as ledger:
        logs = {result.role: sorted((line.stream, line.line) for line in ledger.get_logs(result.run_id))
                for result in batch}  # sorted: the two pipes are read as they fill, not in the order written
    assert logs["close_stdout"] == [("stdout", "before closing")]
    assert logs["swap_streams_and_leave_them"] == logs["drop_streams"] == []
    for index in range(len(breakers)):
        assert logs[f"after-{index}"] == [("stderr", f"role {index} err"), ("stdout", f"role {index} out")]


def test_without_capture_too_a_role_that_closes_or_drops_its_streams_leaves_the_next_role_able_to_print(ledger_path):
    roles = [Role("closer", close_stdout), Role("after-close", say, params={"index": 0}, needs=["closer"]),
             Role("dropper", drop_streams, needs=["after-close"]),
             Role("after-drop", say, params={"index": 1}, needs=["dropper"])]
    batch = parroles.run(roles, ledger=ledger_path, max_concurrent=1, capture_output=False)
    assert batch.ok, [(result.role, result.error) for result in batch]


def test_very_long_lines_are_split(ledger_path):
    from parroles.backends.capture import LINE_LIMIT

    batch = parroles.run([Role("long", lambda: print("y" * (LINE_LIMIT * 2 + 5)))], ledger=ledger_path)
    with Ledger(ledger_path) as ledger:
        sizes = [len(line.line) for line in ledger.get_logs(batch[0].run_id)]
    assert sizes == [LINE_LIMIT, LINE_LIMIT, 5]


def test_capture_can_be_turned_off(ledger_path, capfd):
    batch = parroles.run([Role("loud", lambda: print("straight to the terminal", flush=True))],
                         ledger=ledger_path, capture_output=False)
    assert batch.ok
    seen: list[str] = []
    wait_until(lambda: seen.append(capfd.readouterr().out) or "straight to the terminal" in "".join(seen),
               timeout=10, what="the role's line on the terminal")
    with Ledger(ledger_path) as ledger:
        assert ledger.get_logs(batch[0].run_id) == []


def test_the_dask_backend_captures_too(ledger_path):
    pytest.importorskip("distributed")
    batch = parroles.run([Role("writer", every_way)], ledger=ledger_path, backend="dask", max_concurrent=1)
    assert batch.ok
    with Ledger(ledger_path) as ledger:
        texts = [line.line for line in ledger.get_logs(batch[0].run_id)]
    assert "print to stdout" in texts and "from a child process" in texts


CLI_ROLES = '''
import sys


def talk() -> str:
    print("said on stdout", flush=True)
    print("said on stderr", file=sys.stderr, flush=True)
    return "talked"
'''


def _spec(tmp_path) -> str:
    (tmp_path / "talkroles.py").write_text(CLI_ROLES)
    spec = tmp_path / "talk.toml"
    spec.write_text('[[roles]]\nname = "talker"\ncall = "talkroles:talk"\n\n[[roles]]\nname = "counter"\n'
                    'command = ["sh", "-c", "for i in $(seq 1 25); do echo line $i; done"]\n')
    return str(spec)


def _parroles(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parroles", *args], capture_output=True, text=True, timeout=120)


def test_parroles_run_keeps_the_terminal_clean_and_v_shows_role_lines(tmp_path, ledger_path):
    spec = _spec(tmp_path)
    quiet = _parroles("run", spec, "--ledger", str(ledger_path))
    assert quiet.returncode == 0, quiet.stderr
    assert "said on" not in quiet.stdout + quiet.stderr and "line 25" not in quiet.stdout
    loud = _parroles("run", spec, "--ledger", str(ledger_path), "-v")
    assert loud.returncode == 0, loud.stderr
    assert "talker | said on stdout" in loud.stdout and "talker ! said on stderr" in loud.stdout
    assert "counter | line 25" in loud.stdout


def test_parroles_logs_prints_a_command_roles_lines(tmp_path, ledger_path):
    assert _parroles("run", _spec(tmp_path), "--ledger", str(ledger_path)).returncode == 0
    with Ledger(ledger_path) as ledger:
        (counter,) = [r for r in ledger.list_runs() if str(r.role) == "counter"]
    done = _parroles("logs", counter.run_id, "--ledger", str(ledger_path))
    assert done.returncode == 0 and done.stdout.splitlines() == [f"| line {i}" for i in range(1, 26)]
    tail = _parroles("logs", counter.run_id, "--ledger", str(ledger_path), "--tail", "2", "--stream", "stdout")
    assert tail.stdout.splitlines() == ["line 24", "line 25"]
    assert counter.output["exit_code"] == 0 and counter.output["stdout_tail"][-1] == "line 25"
    missing = _parroles("logs", "00000000-0000-0000-0000-000000000000", "--ledger", str(ledger_path))
    assert missing.returncode == 4


def test_parroles_show_gives_the_last_lines_of_a_failed_run(tmp_path, ledger_path):
    (tmp_path / "failroles.py").write_text("def fail():\n    print('the clue')\n    raise ValueError('broken')\n")
    spec = tmp_path / "fail.toml"
    spec.write_text('[[roles]]\nname = "failer"\ncall = "failroles:fail"\n')
    assert _parroles("run", str(spec), "--ledger", str(ledger_path)).returncode == 1
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.list_runs()
    shown = _parroles("show", run.run_id, "--ledger", str(ledger_path))
    assert "last lines it wrote" in shown.stdout and "| the clue" in shown.stdout


def no_newline(megabytes: int) -> str:
    chunk = "z" * 65536
    for _ in range(megabytes * 16):
        sys.stdout.write(chunk)
    sys.stdout.flush()
    return "done"


def test_output_without_newlines_is_kept_in_line_sized_pieces_and_capped(ledger_path):
    from parroles.backends.capture import LINE_LIMIT

    batch = parroles.run([Role("bar", no_newline, params={"megabytes": 32})], ledger=ledger_path,
                         max_log_bytes=1024 * 1024)
    assert batch[0].status is RunStatus.COMPLETED
    with Ledger(ledger_path) as ledger:
        lines = ledger.get_logs(batch[0].run_id)
    assert all(len(line.line) <= LINE_LIMIT for line in lines)
    assert sum(len(line.line) for line in lines[:-1]) <= 1024 * 1024 and lines[-1].line.startswith("[parroles: ")


def test_a_command_that_leaves_a_background_child_completes(tmp_path, ledger_path):
    spec = tmp_path / "bg.toml"
    spec.write_text('[[roles]]\nname = "bg"\ncommand = ["sh", "-c", "(sleep 30; echo late) & echo started; exit 0"]\n')
    done = _parroles("run", str(spec), "--ledger", str(ledger_path))
    assert done.returncode == 0, done.stdout + done.stderr
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.list_runs()
        assert run.status is RunStatus.COMPLETED and [line.line for line in ledger.get_logs(run.run_id)] == ["started"]


def test_a_long_line_is_cut_between_characters_never_inside_one():
    """A line with no end yet is kept in pieces of at most LINE_LIMIT bytes: each piece ends on a whole
    UTF-8 character (it is decoded alone), so no character becomes U+FFFD however the reads fell."""
    from parroles.backends.capture import LINE_LIMIT, _RoleOutput

    sent: list[tuple[int, str, str, float]] = []
    role = _RoleOutput(sent.extend, 1 << 20, {3: "stdout"})
    text = "ab" + "€" * (LINE_LIMIT // 3 + 100) + "😀" * 5000
    data = text.encode()
    for start in range(0, len(data), 7000):  # as the reads may fall: no newline in any of them
        role.take(3, data[start:start + 7000])
    role.take(3, b"\n")
    role.finish()
    pieces = [line for _, _, line, _ in sent]
    assert len(pieces) > 1 and "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == text and all(len(piece.encode()) <= LINE_LIMIT for piece in pieces)


def write_a_long_line_slowly() -> None:
    import time

    sys.stdout.write("ab" + "€" * 6000)
    sys.stdout.flush()
    time.sleep(0.3)  # the capture reads 18,002 bytes with no newline yet, and keeps a piece of them
    print("€" * 10)


def test_a_long_line_written_in_two_goes_keeps_every_character(ledger_path):
    batch = parroles.run([Role("slow", write_a_long_line_slowly)], ledger=ledger_path)
    with Ledger(ledger_path) as ledger:
        lines = [line.line for line in ledger.get_logs(batch[0].run_id)]
    assert "".join(lines) == "ab" + "€" * 6010, [(len(line), line.count("\ufffd")) for line in lines]


def test_the_last_lines_of_many_runs_come_in_one_query_as_each_runs_own_tail(ledger_path):
    """``Ledger.get_log_tails`` (the report's failure cards) is ``get_logs(tail=...)`` for each run at once."""
    batch = parroles.run([Role("long", many_lines, params={"count": 30, "tag": "long"}),
                          Role("short", many_lines, params={"count": 3, "tag": "short"}),
                          Role("silent", many_lines, params={"count": 0, "tag": "none"})], ledger=ledger_path)
    with Ledger(ledger_path) as ledger:
        tails = ledger.get_log_tails([r.run_id for r in batch], 20)
        each = {r.run_id: ledger.get_logs(r.run_id, tail=20) for r in batch}
    assert [len(tails.get(r.run_id, [])) for r in batch] == [20, 3, 0]
    assert all(tails.get(run_id, []) == lines for run_id, lines in each.items())
