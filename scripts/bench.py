"""Benchmark parroles against its peers, side by side, on this machine.

    python scripts/bench.py            # every workload, 5 repetitions, medians and ratios
    python scripts/bench.py --json     # the same as JSON
    python scripts/bench.py --only a,b --reps 3
    python scripts/bench.py --scale 0.05 --reps 1   # a quick smoke run (targets are for scale 1)

Peers and parroles alternate within each repetition, so drift on a shared
machine hits both alike; the ratios are what count (a and b: the median of
each repetition's own ratio). Workloads (see issue 5):
a no-op roles vs loky/ProcessPoolExecutor/joblib, b CPU-bound speed-up,
c the ledger writer alone (and its journal's own cost), d `parroles sql` over 1M runs, e `parroles --help`,
f fail-fast latency, g parent memory, h event throughput, i cold start (whole `parroles run` against a
plain loky script; a fresh process's first batch through the API against serial), j pipelines (a chain's
handoff gap, a fan-out/fan-in), k captured output per line, r what a retry costs beyond its delay, u reuse,
v the batch report (`parroles report`) of 10,000 runs: its size, and how long headless Chromium takes to open it.

parroles' modules are compiled to bytecode first, as ``pip install`` does: run from a source checkout
with PYTHONDONTWRITEBYTECODE set, every fresh process (each `parroles run`, each worker) would otherwise
compile them anew (about 45 ms per `parroles run` here), which no installed copy pays.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loky
import psutil

import parroles
from parroles import Ledger, ParallelRoleConfig, Role, RunStatus, execute_roles_parallel, shutdown_workers
from parroles.digests import content_digest
from parroles.ledger.pending import NewRuns
from parroles.ledger.writer import LedgerWriter

DIGEST = content_digest(b"bench")
CPU_ROLE_SECONDS = 0.25


# -- the work the roles do -------------------------------------------------------------------


def noop(*_: Any) -> None:
    return None


def pause(*_: Any) -> None:
    time.sleep(0.1)


def spin(loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


def spin_times(loops: int, times: int) -> None:
    for _ in range(times):
        spin(loops)


def calibrate(seconds: float) -> int:
    """Loops of ``spin`` that take about ``seconds`` on this machine."""
    loops = 200_000
    begin = time.perf_counter()
    spin(loops)
    return max(1, int(loops * seconds / (time.perf_counter() - begin)))


def cpu_role(loops: int) -> Callable[[Any, str], int]:
    return lambda role, run_id: spin(loops)


def polling_role(loops: int, fail_after: float) -> Callable[[Any, str], int]:
    def role(name: Any, run_id: str) -> int:
        import parroles

        ctx = parroles.context()
        if str(name) == "fail":
            time.sleep(fail_after)
            raise RuntimeError("planned failure")
        while True:
            spin(loops)
            if str(name) == "polite":
                ctx.check_cancelled()

    return role


def emitting_role(count: int) -> Callable[[Any, str], int]:
    def role(name: Any, run_id: str) -> int:
        import parroles

        if str(name) == "emitter":
            ctx = parroles.context()
            for i in range(count):
                ctx.emit("tick", {"i": i})
        else:
            for i in range(count):
                json.dumps({"i": i})  # the same payload work, without the event
        return count

    return role


# -- measuring --------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


class SelfTimed:
    """A contender that measures itself (e.g. inside a process of its own) and returns its seconds."""

    def __init__(self, measure: Callable[[], float]) -> None:
        self.measure = measure


Contender = Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any]] | SelfTimed


def alternate(reps: int, contenders: dict[str, Contender]) -> dict[str, float]:
    """Median seconds of each contender, run in turn within each repetition."""
    return {name: statistics.median(values) for name, values in alternate_times(reps, contenders).items()}


def alternate_times(reps: int, contenders: dict[str, Contender]) -> dict[str, list[float]]:
    """Seconds of each contender in each repetition, run in turn within a repetition.

    A contender is a function, or (setup, function) when something must be
    undone before it runs (its setup is not timed).
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, contender in contenders.items():
            if isinstance(contender, SelfTimed):
                times[name].append(contender.measure())
                continue
            setup, fn = contender if isinstance(contender, tuple) else (None, contender)
            if setup is not None:
                setup()
            times[name].append(timed(fn))
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over repetitions of numerator / denominator: each pair ran side by side, so drift cancels."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))


# Executors a cold contender started; stopped by the next cold setup, so that no
# contender's teardown is timed (parroles, by default, keeps its pool idle too).
_left_running: list[Any] = []


def run_tasks(executor: Any, count: int, fn: Callable[..., Any], *args: Any) -> None:
    """``count`` tasks of ``fn(*args)`` submitted to ``executor`` at once, then every result."""
    for future in [executor.submit(fn, *args) for _ in range(count)]:
        future.result()


def new_executor(kind: Callable[[int], Any]) -> Any:
    """A cold 2-worker executor of ``kind``, left running for the next cold setup to stop (untimed)."""
    executor = kind(2)
    _left_running.append(executor)
    return executor


def stop_pools() -> None:
    """Stop every pool a contender left (parroles' idle pool included) and wait until its processes are gone."""
    shutdown_workers()
    loky.get_reusable_executor(2).shutdown(wait=True)
    while _left_running:
        _left_running.pop().shutdown(wait=True)
    # Let the stopped processes finish exiting, so their teardown is not timed as the next start.
    me = psutil.Process()
    exiting = [p for p in me.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    psutil.wait_procs(exiting, timeout=10)


def cold(fn: Callable[[], Any]) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``fn`` started without warm workers: every pool is stopped and its processes gone first."""
    return stop_pools, fn


def warm_up(ledger: str) -> None:
    """Both warm contenders' pools up, every worker of each booted, before either is timed.

    Each worker must take one pausing task, so no worker is still starting (and
    taking a core) while the next contender runs.
    """
    run_batch(ledger, ["warm"] * 2, pause, max_concurrent=2)
    executor = loky.get_reusable_executor(2)
    for future in [executor.submit(pause) for _ in range(2)]:
        future.result()


def run_batch(ledger: str, roles: list[str] | list[Role], executor: Callable[..., Any], **config: Any) -> list[Any]:
    return execute_roles_parallel(ledger, f"bench-{uuid.uuid4().hex}", roles, DIGEST,
                                  ParallelRoleConfig(**config), executor)


def row(workload: str, measure: str, value: float, unit: str, target: str, ok: bool,
        peers: dict[str, float] | None = None) -> dict[str, Any]:
    return {"workload": workload, "measure": measure, "parroles": round(value, 4), "unit": unit,
            "peers": {k: round(v, 4) for k, v in (peers or {}).items()}, "target": target, "met": ok}


# -- the workloads ------------------------------------------------------------------------------


def workload_a(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    n = max(20, int(2000 * scale))
    ledger = str(tmp / "a.duckdb")

    def loky_tasks(executor: Any) -> None:
        run_tasks(executor, n, noop)

    def joblib_with(batch_size: int | str) -> SelfTimed:
        # In a process of its own: importing joblib's copy of loky next to loky
        # makes every later loky worker start 2-3x slower (measured), which
        # would tax every cold contender after it. A new process is cold anyway.
        script = (f"import time, joblib\nnoop = lambda *_: None\nbegin = time.perf_counter()\n"
                  f"joblib.Parallel(n_jobs=2, backend='loky', batch_size={batch_size!r})"
                  f"(joblib.delayed(noop)() for _ in range({n}))\nprint(time.perf_counter() - begin)")
        return SelfTimed(lambda: float(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                                      text=True).stdout.split()[-1]))

    def parroles(**config: Any) -> Callable[[], Any]:
        return lambda: run_batch(ledger, ["noop"] * n, noop, max_concurrent=2, **config)

    # Warm contenders first, on pools that stay up across repetitions; then the cold ones.
    warm_up(ledger)
    times = alternate_times(reps, {
        "parroles warm": parroles(),
        "parroles warm, capture off": parroles(capture_output=False),
        "loky reusable warm": lambda: loky_tasks(loky.get_reusable_executor(2)),
    })
    times |= alternate_times(reps, {
        "parroles cold": cold(parroles()),
        "loky cold": cold(lambda: loky_tasks(new_executor(loky.ProcessPoolExecutor))),
        "ProcessPoolExecutor cold": cold(lambda: loky_tasks(new_executor(concurrent.futures.ProcessPoolExecutor))),
        "joblib batch_size=1 cold": joblib_with(1),
        "joblib auto cold": joblib_with("auto"),
    })
    medians = {name: statistics.median(values) for name, values in times.items()}
    ours = medians.pop("parroles warm")
    warm_ratio = paired_ratio(times, "parroles warm", "loky reusable warm")
    quiet_ratio = paired_ratio(times, "parroles warm, capture off", "loky reusable warm")
    cold_ratio = paired_ratio(times, "parroles cold", "loky cold")
    return [row("a", f"{n} no-op roles, 2 workers, on-disk ledger, warm workers: seconds", ours, "s", "", True,
                medians),
            row("a", "parroles / loky, both warm (a process's later batches), output captured (the default)",
                warm_ratio, "x", "<= 0.9", warm_ratio <= 0.9),
            row("a", "parroles / loky, both warm, capture_output=False", quiet_ratio, "x", "<= 0.85",
                quiet_ratio <= 0.85),
            row("a", "parroles / loky, both cold (a process's first batch)", cold_ratio, "x", "<= 1.5",
                cold_ratio <= 1.5)]


def workload_b(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    loops = calibrate(CPU_ROLE_SECONDS * min(1.0, scale * 4))
    ledger = str(tmp / "b.duckdb")
    work = cpu_role(loops)

    def serial() -> None:
        for _ in range(8):
            spin(loops)

    def loky_tasks(executor: Any) -> None:
        run_tasks(executor, 8, spin, loops)

    def bare_processes() -> None:
        # The machine's own limit: two forked processes, four roles' work each, no pool at all.
        fork = multiprocessing.get_context("fork")
        processes = [fork.Process(target=spin_times, args=(loops, 4)) for _ in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()

    def parroles(**config: Any) -> Callable[[], Any]:
        return lambda: run_batch(ledger, ["cpu"] * 8, work, max_concurrent=2, **config)

    # Warm contenders first, on pools that stay up across repetitions; then the cold ones,
    # each set with its own serial runs, so every speed-up pairs runs made side by side.
    warm_up(ledger)
    warm_times = alternate_times(reps, {
        "parroles warm": parroles(),
        "serial": serial,
        "loky reusable warm": lambda: loky_tasks(loky.get_reusable_executor(2)),
        "two bare processes": bare_processes,
    })
    cold_times = alternate_times(reps, {"parroles cold": cold(parroles()), "serial": serial,
                                        "loky cold": cold(lambda: loky_tasks(new_executor(loky.ProcessPoolExecutor)))})
    times = warm_times | {name: values for name, values in cold_times.items() if name != "serial"}
    medians = {name: statistics.median(values) for name, values in times.items()}
    ours = medians.pop("parroles warm")
    speedup = {name: paired_ratio(warm_times, "serial", name) for name in warm_times if name != "serial"}
    speedup |= {name: paired_ratio(cold_times, "serial", name) for name in cold_times if name != "serial"}
    warm, cold_speedup = speedup.pop("parroles warm"), speedup.pop("parroles cold")
    ceiling = speedup["two bare processes"]
    return [row("b", "8 CPU-bound roles, 2 workers, warm workers: seconds", ours, "s", "", True, medians),
            row("b", "speed-up over serial, warm workers (a process's later batches)", warm, "x", ">= 1.8",
                warm >= 1.8, {f"{name} speed-up": value for name, value in speedup.items()}),
            row("b", "speed-up over serial, cold workers (a process's first batch)", cold_speedup, "x", ">= 1.8",
                cold_speedup >= 1.8),
            row("b", "warm speed-up / two bare processes' speed-up (the machine's limit)", warm / ceiling, "x",
                "", True)]


def workload_c(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    runs, events = max(100, int(100_000 * scale)), max(1000, int(1_000_000 * scale))
    run_rates, event_rates = [], []
    for rep in range(reps):
        writer = LedgerWriter(str(tmp / f"c-{rep}.duckdb"))
        writer.open()
        ids = [str(uuid.uuid4()) for _ in range(runs)]
        now = time.time()
        begin = time.perf_counter()
        batch = {"batch_id": "c", "name": None, "spec_digest": DIGEST, "config": "{}", "state": "RUNNING",
                 "started_at": now, "n_roles": runs, "owner_host": "bench", "owner_pid": 0, "owner_started": 0.0}
        # As the executor drives it: records are enqueued as they happen, the
        # writer thread group-commits in the background, and a flush ends it.
        writer.start_batch(batch, NewRuns(ids, list(range(runs)), ["r"] * runs, "c", DIGEST, None, now))
        for run_id in ids:
            writer.transition(run_id, RunStatus.RUNNING, started_at=now, worker_pid=1, attempt=1)
        for run_id in ids:
            writer.transition(run_id, RunStatus.COMPLETED, finished_at=now, duration_ms=1.0, output="null")
        writer.flush()
        run_rates.append(runs / (time.perf_counter() - begin))
        targets = [str(uuid.uuid4()) for _ in range(100)]  # events spread over 100 active runs
        writer.start_runs(NewRuns(targets, [0] * len(targets), ["e"] * len(targets), "c", DIGEST, None, now))
        writer.flush()
        begin = time.perf_counter()
        for n in range(events):
            writer.add_event(targets[n % len(targets)], "tick", '{"n":1}', now)
        writer.flush()
        event_rates.append(events / (time.perf_counter() - begin))
        writer.close()
    row_at_a_time = _row_at_a_time_rate(tmp)
    run_rate, event_rate = statistics.median(run_rates), statistics.median(event_rates)
    journal_us = statistics.median(_journal_cost(tmp / f"j-{rep}.duckdb", runs) for rep in range(reps))
    commit_us = 1e6 / run_rate / 3  # a run's three records (insert, two transitions), committed through the writer
    return [row("c", f"ledger writer: {runs} runs, QUEUED->RUNNING->COMPLETED, runs/s", run_rate, "/s", ">= 100000",
                run_rate >= 100_000, {"row-at-a-time INSERT rows/s": row_at_a_time}),
            row("c", f"ledger writer: {events} events, events/s", event_rate, "/s", ">= 200000",
                event_rate >= 200_000, {"row-at-a-time INSERT rows/s": row_at_a_time}),
            row("c", "journal alone (encode, write, fsync): microseconds per record", journal_us, "us", "<= 2",
                journal_us <= 2, {"the writer's whole cost per run record": commit_us})]


def _journal_cost(ledger: Path, runs: int) -> float:
    """Microseconds per record to journal a group like row c's (inserts, transitions, events)."""
    from parroles.ledger.journal import Journal, encode
    from parroles.ledger.pending import Pending

    now, ids = time.time(), [str(uuid.uuid4()) for _ in range(runs)]
    pending = Pending()
    pending.add_runs(NewRuns(ids, list(range(runs)), ["r"] * runs, "j", DIGEST, None, now))
    for run_id in ids:
        pending.run_updates[run_id] = {"status": "COMPLETED", "started_at": now, "worker_pid": 1, "attempt": 1,
                                       "finished_at": now, "duration_ms": 1.0, "output": "null"}
        pending.events.append((run_id, 1, "tick", '{"n":1}', now))
    journal = Journal(str(ledger))
    begin = time.perf_counter()
    journal.append(encode(pending))
    journal.sync()
    elapsed = time.perf_counter() - begin
    journal.clear()
    journal.close()
    return elapsed * 1e6 / pending.rows()


def _row_at_a_time_rate(tmp: Path, rows: int = 1000) -> float:
    import duckdb

    con = duckdb.connect(str(tmp / "rows.duckdb"))
    con.execute("CREATE TABLE t (id UUID PRIMARY KEY, status VARCHAR, ts TIMESTAMPTZ)")
    begin = time.perf_counter()
    for _ in range(rows):
        con.execute("INSERT INTO t VALUES (?, 'QUEUED', now())", [str(uuid.uuid4())])
    rate = rows / (time.perf_counter() - begin)
    con.close()
    return rate


def workload_d(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    import duckdb

    runs = max(1000, int(1_000_000 * scale))
    ledger = tmp / "d.duckdb"
    with Ledger(ledger):
        pass
    con = duckdb.connect(str(ledger))
    con.execute(f"""
        INSERT INTO runs (run_id, parent_run_id, position, role, status, agent_name, queued_at, duration_ms, attempt)
        SELECT uuid(), 'batch-' || (i // 1000), i % 1000, ['planner','coder','reviewer','tester','fixer'][i % 5 + 1],
               ['COMPLETED','FAILED','CANCELLED'][i % 3 + 1], 'role:x', now(), random() * 1000, 1
        FROM range({runs}) t(i)""")
    con.close()
    query = "SELECT role, status, count(*) AS n, avg(duration_ms) AS ms FROM runs GROUP BY ALL ORDER BY ALL"
    command = [sys.executable, "-m", "parroles", "sql", query, "--ledger", str(ledger), "--format", "csv"]

    def in_process() -> None:
        connection = duckdb.connect(str(ledger), read_only=True)
        connection.execute(query).fetchall()
        connection.close()

    medians = alternate(reps, {"parroles": lambda: subprocess.run(command, check=True, capture_output=True),
                               "duckdb in-process": in_process})
    ours = medians.pop("parroles")
    return [row("d", f"parroles sql group-by over {runs} runs, whole process: seconds", ours, "s", "<= 0.5",
                ours <= 0.5, medians)]


def workload_e(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    medians = alternate(max(reps, 5), {
        "parroles": lambda: subprocess.run([sys.executable, "-m", "parroles", "--help"], check=True,
                                           capture_output=True),
        "python -c pass": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)})
    ours = medians.pop("parroles")
    return [row("e", "parroles --help, whole process: seconds", ours, "s", "<= 0.25", ours <= 0.25, medians)]


def workload_f(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    ledger = str(tmp / "f.duckdb")
    loops = calibrate(0.01)
    grace = 1.0
    rows = []
    for style, limit in (("polite", 0.25), ("deaf", grace + 0.25)):
        latencies = []
        for _ in range(reps):
            roles = [style] * 4 + ["fail"]
            begin = time.time()
            try:
                results = run_batch(ledger, roles, polling_role(loops, 0.3), max_concurrent=5, fail_fast=True,
                                    cancel_grace=grace)
            except Exception as exc:  # noqa: BLE001 - every role failing still carries the results
                results = exc.results  # type: ignore[attr-defined]
            returned = time.time()
            with Ledger(ledger) as opened:
                failed_at = opened.get_run(results[-1].run_id).finished_at.timestamp()
            assert failed_at > begin
            latencies.append(returned - failed_at)
        latency = statistics.median(latencies)
        what = "polling cancelled()" if style == "polite" else f"never polling (cancel_grace {grace:g} s)"
        rows.append(row("f", f"fail-fast, 4 CPU-bound roles {what}: return after the failure, s", latency, "s",
                        f"<= {limit:g}", latency <= limit))
    return rows


def workload_g(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    n = max(100, int(10_000 * scale))
    script = f"""
import json, sys, uuid, psutil
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench import run_batch, noop
ledger = {str(tmp / 'g.duckdb')!r}
run_batch(ledger, ["noop"] * {n}, noop, max_concurrent=2)
# VmHWM: this process's own peak RSS (ru_maxrss would include the bench process
# it was forked from, since Linux keeps the maximum across execve).
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
rss = []
for _ in range(5):
    run_batch(ledger, ["noop"] * {max(20, n // 5)}, noop, max_concurrent=2)
    rss.append(psutil.Process().memory_info().rss / 2**20)
print(json.dumps({{"peak": peak, "rss": rss}}))
"""
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    growth = measured["rss"][-1] - measured["rss"][1]
    return [row("g", f"{n} no-op roles: peak RSS of the parent, MB", measured["peak"], "MB", "<= 250",
                measured["peak"] <= 250),
            row("g", "RSS growth over batches 2..5 in one process, MB", growth, "MB", "<= 10 (flat)", growth <= 10,
                {f"after batch {i + 1}": v for i, v in enumerate(measured["rss"])})]


def workload_h(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    count = max(100, int(10_000 * scale))
    ledger = str(tmp / "h.duckdb")
    role = emitting_role(count)
    results: dict[str, Any] = {}

    def with_events() -> None:
        results["emitter"] = run_batch(ledger, ["emitter"], role, max_concurrent=1)

    medians = alternate(reps, {"parroles": with_events,
                               "same role, no events": lambda: run_batch(ledger, ["plain"], role, max_concurrent=1)})
    per_event = (medians["parroles"] - medians["same role, no events"]) / count * 1e6
    with Ledger(ledger) as opened:
        stored = opened.get_events(results["emitter"][0].run_id)
    in_order = [e.seq for e in stored] == list(range(1, count + 1)) and \
        [e.payload["i"] for e in stored] == list(range(count))
    return [row("h", f"one role emitting {count} events: microseconds per event", per_event, "us", "<= 100",
                per_event <= 100, medians),
            row("h", f"all {count} events stored in order", float(in_order), "bool", "== 1", in_order)]


def printing_role(count: int) -> Callable[[Any, str], int]:
    def role(name: Any, run_id: str) -> int:
        if str(name) == "printer":
            for i in range(count):
                print(f"line {i}")
        else:
            with open(os.devnull, "w") as sink:  # the same writing, to nowhere
                for i in range(count):
                    print(f"line {i}", file=sink)
        return count
    return role


def workload_k(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    """One role printing 100,000 lines, captured into its run, against the same role printing to /dev/null."""
    count = max(1000, int(100_000 * scale))
    ledger = str(tmp / "k.duckdb")
    role = printing_role(count)
    results: dict[str, Any] = {}

    def captured() -> None:
        results["printer"] = run_batch(ledger, ["printer"], role, max_concurrent=1)

    medians = alternate(reps, {"parroles": captured,
                               "same role, to /dev/null": lambda: run_batch(ledger, ["quiet"], role,
                                                                            max_concurrent=1)})
    per_line = (medians["parroles"] - medians["same role, to /dev/null"]) / count * 1e6
    with Ledger(ledger) as opened:
        (stored, ordered), = opened.query(
            "SELECT count(*), bool_and(line = 'line ' || (seq - 1)) FROM logs WHERE run_id = ?::UUID",
            [results["printer"][0].run_id])
    complete = stored == count and bool(ordered)
    return [row("k", f"one role printing {count} lines, captured: microseconds per line", per_line, "us", "<= 10",
                per_line <= 10, medians),
            row("k", f"all {count} lines stored in order", float(complete), "bool", "== 1", complete)]


COLD_ROLES = """
import time


def noop() -> None:
    return None


def spin(seconds: float = 0.2) -> int:
    end, total = time.process_time() + seconds, 0
    while time.process_time() < end:
        total += 1
    return total
"""
FRESH_API_SCRIPT = """
import sys, time
begin = time.perf_counter()
import parroles
sys.path.insert(0, {folder!r})
import coldroles
def main():
    result = parroles.run(["r%d" % i for i in range(8)], lambda role, run_id: coldroles.spin(), ledger={ledger!r},
                          max_concurrent=2, start_method=sys.argv[1])
    assert result.ok, result
    print(time.perf_counter() - begin)


if __name__ == "__main__":  # forked workers import this script again
    main()
"""
BARE_SCRIPT = """
import multiprocessing, sys, time
begin = time.perf_counter()
sys.path.insert(0, {folder!r})
import coldroles
def four():
    for _ in range(4):
        coldroles.spin()
if __name__ == "__main__":
    processes = [multiprocessing.get_context("fork").Process(target=four) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    print(time.perf_counter() - begin)
"""
LOKY_SCRIPT = """
import sys
from loky import ProcessPoolExecutor
sys.path.insert(0, {folder!r})
import coldroles
count, fn = int(sys.argv[1]), getattr(coldroles, sys.argv[2])
with ProcessPoolExecutor(max_workers=2) as executor:
    for future in [executor.submit(fn) for _ in range(count)]:
        future.result()
"""
# The same, writing a row per role to a DuckDB file it opens first, as any ledger must before a role runs:
# what DuckDB alone adds to a plain script (a bar to read `parroles run`'s ratio against, not a strict floor:
# a process may still skip work a plain script does, as `parroles` skips its last garbage collections).
LOKY_DUCKDB_SCRIPT = """
import sys
from loky import ProcessPoolExecutor
sys.path.insert(0, {folder!r})
import coldroles
import duckdb
count, fn = int(sys.argv[1]), getattr(coldroles, sys.argv[2])
con = duckdb.connect(sys.argv[3])
con.execute("CREATE TABLE IF NOT EXISTS runs (role INTEGER, result BIGINT)")
with ProcessPoolExecutor(max_workers=2) as executor:
    for role, future in enumerate([executor.submit(fn) for _ in range(count)]):
        con.execute("INSERT INTO runs VALUES (?, ?)", [role, future.result()])
con.close()
"""
# A fresh process's first batch on loky alone (no parroles, no ledger), timed as FRESH_API_SCRIPT is.
FRESH_LOKY_SCRIPT = """
import sys, time
begin = time.perf_counter()
from loky import get_reusable_executor
sys.path.insert(0, {folder!r})
import coldroles
if __name__ == "__main__":
    executor = get_reusable_executor(max_workers=2)
    for future in [executor.submit(coldroles.spin) for _ in range(8)]:
        future.result()
    print(time.perf_counter() - begin)
"""


def workload_i(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    """Every `parroles run` is a process's first batch: whole processes, against a plain loky script."""
    (tmp / "coldroles.py").write_text(COLD_ROLES)
    (tmp / "cold_loky.py").write_text(LOKY_SCRIPT.format(folder=str(tmp)))
    (tmp / "cold_loky_duckdb.py").write_text(LOKY_DUCKDB_SCRIPT.format(folder=str(tmp)))
    rows = []
    for label, count, fn in (("2 no-op roles", 2, "noop"), ("8 CPU-bound roles of 0.2 s", 8, "spin")):
        spec = tmp / f"cold-{fn}.toml"
        spec.write_text("[batch]\nmax_concurrent = 2\n" + "".join(
            f'[[roles]]\nname = "r{i}"\ncall = "coldroles:{fn}"\n' for i in range(count)))
        ledger = str(tmp / f"cold-{fn}.duckdb")
        ours = [sys.executable, "-m", "parroles", "run", str(spec), "--ledger", ledger, "--quiet"]
        subprocess.run(ours, check=True, capture_output=True)  # the ledger exists, as in the issue
        plain = [sys.executable, str(tmp / "cold_loky.py"), str(count), fn]
        with_duckdb = [sys.executable, str(tmp / "cold_loky_duckdb.py"), str(count), fn,
                       str(tmp / f"plain-{fn}.duckdb")]
        times = alternate_times(reps, {
            name: lambda command=command: subprocess.run(command, check=True, capture_output=True)
            for name, command in (("parroles run", ours), ("plain loky script", plain),
                                  ("loky script writing to DuckDB", with_duckdb))})
        ratio = paired_ratio(times, "parroles run", "plain loky script")
        target = 1.3 if fn == "noop" else 1.10
        peers = {name: statistics.median(values) for name, values in times.items()}
        peers["loky script writing to DuckDB / plain loky script"] = paired_ratio(
            times, "loky script writing to DuckDB", "plain loky script")
        rows.append(row("i", f"{label}, whole process: parroles run / plain loky script", ratio, "x",
                        f"<= {target}", ratio <= target, peers))
    return rows + _fresh_first_batch(tmp, reps)


def _fresh_first_batch(tmp: Path, reps: int) -> list[dict[str, Any]]:
    """A fresh process's first batch of 8 CPU-bound roles through the API, ledger open included (timed inside
    the process, from before ``import parroles``), against the same roles run one after another here."""
    sys.path.insert(0, str(tmp))
    import coldroles  # type: ignore[import-not-found]  # written by workload_i

    ledger = str(tmp / "fresh.duckdb")
    api, bare, plain = tmp / "fresh_api.py", tmp / "bare.py", tmp / "fresh_loky.py"
    api.write_text(FRESH_API_SCRIPT.format(folder=str(tmp), ledger=ledger))
    bare.write_text(BARE_SCRIPT.format(folder=str(tmp)))
    plain.write_text(FRESH_LOKY_SCRIPT.format(folder=str(tmp)))

    def seconds_printed(*command: str) -> SelfTimed:
        return SelfTimed(lambda: float(subprocess.run([sys.executable, *command], check=True, capture_output=True,
                                                      text=True).stdout.split()[-1]))

    times = alternate_times(reps, {"start_method loky": seconds_printed(str(api), "loky"),
                                   "start_method forkserver": seconds_printed(str(api), "forkserver"),
                                   "serial": lambda: [coldroles.spin() for _ in range(8)],
                                   "two bare processes, fresh": seconds_printed(str(bare)),
                                   "plain loky script, fresh": seconds_printed(str(plain))})
    medians = {"two bare processes' speed-up": paired_ratio(times, "serial", "two bare processes, fresh")}
    medians |= {name: statistics.median(values) for name, values in times.items()}
    # The bar loky itself reaches, with no ledger and no parroles: the same share, for the same work.
    medians["plain loky script's share"] = (paired_ratio(times, "serial", "plain loky script, fresh")
                                            / medians["two bare processes' speed-up"])
    rows = []
    for method in ("loky", "forkserver"):
        speedup = paired_ratio(times, "serial", f"start_method {method}")
        share = speedup / medians["two bare processes' speed-up"]
        rows.append(row("i", f"a fresh process's first batch of 8 CPU-bound roles (API, ledger open included, "
                        f"start_method {method}): speed-up over serial / two bare fresh processes' speed-up", share,
                        "x", ">= 0.8", share >= 0.8, medians | {f"speed-up, start_method {method}": speedup}))
    return rows


def chain_gaps_ms(ledger: str, n: int) -> list[float]:
    """One warm chain of ``n`` no-op roles, each needing the one before: from each role's end to the next
    one's start, in ms, as the ledger has them (both read in the workers)."""
    roles = [Role(f"link-{i}", noop, needs=[f"link-{i - 1}"] if i else []) for i in range(n)]
    batch_id = f"bench-chain-{uuid.uuid4().hex}"
    results = execute_roles_parallel(ledger, batch_id, roles, DIGEST, ParallelRoleConfig(max_concurrent=2))
    assert all(r.status is RunStatus.COMPLETED for r in results)
    with Ledger(ledger) as opened:
        runs = opened.list_runs(batch_id)
    return [(after.started_at - before.finished_at).total_seconds() * 1000
            for before, after in zip(runs, runs[1:], strict=False)]


def fan_out_roles(n: int) -> list[Role]:
    """A root, ``n`` roles that each need it, and a fan-in that needs them all."""
    wide = [Role(f"leaf-{i}", noop, needs=["root"]) for i in range(n)]
    return [Role("root", noop), *wide, Role("fan-in", noop, needs=[str(r.name) for r in wide])]


def workload_j(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    chain, wide = max(10, int(200 * scale)), max(10, int(1000 * scale))
    ledger = str(tmp / "i.duckdb")
    warm_up(ledger)
    # The median over every gap of every repetition: each chain is one sample of many handoffs.
    gaps = [gap for _ in range(reps) for gap in chain_gaps_ms(ledger, chain)]
    gap = statistics.median(gaps)
    roles = fan_out_roles(wide)
    medians = alternate(reps, {"fan-out": lambda: run_batch(ledger, roles, noop, max_concurrent=2)})
    return [row("j", f"chain of {chain} no-op roles, warm: median gap from one's end to the next one's start, ms",
                gap, "ms", "<= 5", gap <= 5, {"p90 gap ms": statistics.quantiles(gaps, n=10)[-1]}),
            row("j", f"1 root, {wide} roles needing it, 1 fan-in needing them all, warm: seconds", medians["fan-out"],
                "s", "", True)]


def fails_once() -> int:
    """Asks for another attempt, at once, on its first; then returns."""
    if parroles.context().attempt == 1:
        raise parroles.Retry("once", after=0.0)
    return 2


def retry_gap_ms(ledger: str) -> float:
    """A warm batch of one role that fails once: from its first attempt's end to its retry's start, in ms (the
    ledger's times, both read in the workers), no delay asked: what a retry itself costs, no queue behind it."""
    batch_id = f"bench-retry-{uuid.uuid4().hex}"
    (result,) = execute_roles_parallel(ledger, batch_id, [Role("retry", fails_once, retries=1)], DIGEST,
                                       ParallelRoleConfig(max_concurrent=2))
    assert result.status is RunStatus.COMPLETED and result.attempt == 2
    with Ledger(ledger) as opened:
        first, second = sorted(opened.list_runs(batch_id), key=lambda run: run.attempt)
    return (second.started_at - first.finished_at).total_seconds() * 1000


def workload_r(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    n = max(5, int(30 * scale))
    ledger = str(tmp / "r.duckdb")
    warm_up(ledger)
    gaps = [retry_gap_ms(ledger) for _ in range(reps * n)]
    gap = statistics.median(gaps)
    return [row("r", "a role failing once, warm, no delay asked: gap from its attempt's end to its retry's start, "
                "ms", gap, "ms", "<= 20", gap <= 20, {"p90 gap ms": statistics.quantiles(gaps, n=10)[-1]})]


def square(x: int) -> int:
    return x * x


def keys_seconds(count: int) -> float:
    """Seconds to compute the cache keys of ``count`` roles of one function (a matrix), as a batch does."""
    from parroles.runner.reuse import RunKeys
    from parroles.runner.tracked import TrackedRun

    roles = Role("square", square).expand(x=list(range(count)))
    runs = [TrackedRun(i, role.name, str(role.name), str(i), None) for i, role in enumerate(roles)]
    begin = time.perf_counter()
    keys = RunKeys(roles, None, None)
    for run in runs:
        run.key = keys.key(run, runs)
    return time.perf_counter() - begin


def workload_u(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    n = max(50, int(1000 * scale))
    ledger = str(tmp / "u.duckdb")
    roles = Role("square", square).expand(x=list(range(n)))
    first = parroles.run(roles, ledger=ledger, max_concurrent=2)
    assert first.ok
    stop_pools()  # a batch reused whole starts no worker: none is up to help it either

    def reused() -> None:
        again = parroles.run(roles, ledger=ledger, max_concurrent=2, reuse=True)
        assert all(result.reason is parroles.Reason.REUSED for result in again)

    times = alternate_times(reps, {"reused": reused, "ran (warm)": lambda: run_batch(ledger, roles, noop,
                                                                                      max_concurrent=2)})
    medians = {name: statistics.median(values) for name, values in times.items()}
    keys = statistics.median(keys_seconds(10 * n) for _ in range(reps))
    return [row("u", f"{n} roles reused whole (no worker started), ledger open included: seconds",
                medians["reused"], "s", "<= 0.5", medians["reused"] <= 0.5,
                {"the same roles run": medians["ran (warm)"]}),
            row("u", f"cache keys of {10 * n} roles of one function: seconds", keys, "s", "<= 0.5", keys <= 0.5)]


def workload_v(tmp: Path, scale: float, reps: int) -> list[dict[str, Any]]:
    from parroles.report import browser

    n = max(50, int(10_000 * scale))
    ledger = str(tmp / "v.duckdb")
    batch = parroles.run([f"r{i}" for i in range(n)], noop, ledger=ledger, name="v", max_concurrent=2)
    begin = time.perf_counter()
    path = parroles.write_report(ledger, batch.batch_id, tmp / "v.html")
    written = time.perf_counter() - begin
    loads = []
    for _ in range(reps):  # a fresh browser each time: what a person opening the file waits for
        with browser.opened(path) as opened:
            assert opened.errors == [] and opened.page.locator("#runs-table tbody tr").count() == n
            loads.append(opened.load_seconds)
    load, mib = statistics.median(loads), path.stat().st_size / 2**20
    return [row("v", f"report of {n} runs opened in headless Chromium, to its first frame after load: seconds",
                load, "s", "<= 2", load <= 2),
            row("v", f"report of {n} runs: MiB", mib, "MiB", "<= 5", mib <= 5),
            row("v", f"report of {n} runs written (ledger read, rendered, written): seconds", written, "s", "<= 5",
                written <= 5)]


WORKLOADS = {"a": workload_a, "b": workload_b, "c": workload_c, "d": workload_d, "e": workload_e,
             "f": workload_f, "g": workload_g, "h": workload_h, "i": workload_i, "j": workload_j, "k": workload_k,
             "r": workload_r, "u": workload_u, "v": workload_v}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per workload (medians are reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="size of every workload (1 = the targets' size)")
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. a,b")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    chosen = [w for w in (args.only.split(",") if args.only else WORKLOADS) if w]
    rows: list[dict[str, Any]] = []
    # As pip install does (see the docstring); in a process of its own, so this one stays as small as it was.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(parroles.__file__).parent)], check=True)
    with tempfile.TemporaryDirectory(prefix="parroles-bench-") as tmp:
        for name in chosen:
            rows.extend(WORKLOADS[name](Path(tmp), args.scale, args.reps))
            stop_pools()  # nothing a workload started runs on beside the next one
            if not args.json:
                print(f"... workload {name} done", file=sys.stderr, flush=True)
    machine = {"cores": os.cpu_count(), "python": sys.version.split()[0], "scale": args.scale, "reps": args.reps}
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=2))
    else:
        print(f"# parroles bench: {machine['cores']} cores, Python {machine['python']}, scale {args.scale}, "
              f"{args.reps} repetitions, medians")
        print("| # | measure | parroles | peers | target | met |\n|---|---|---|---|---|---|")
        for r in rows:
            peers = ", ".join(f"{k} {v:g}" for k, v in r["peers"].items())
            print(f"| {r['workload']} | {r['measure']} | {r['parroles']:g} | {peers} | {r['target']} | "
                  f"{'yes' if r['met'] else 'NO'} |")
    return 1 if args.strict and not all(r["met"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
