"""How fast a stop travels between processes: the Manager event against the channel (issue 22).

    PYTHONPATH=. python scripts/stop_transport.py             # 300 repetitions, 2 waiting workers
    PYTHONPATH=. python scripts/stop_transport.py --reps 50 --workers 3

Real processes on this machine, built from parroles' own parts: a pool's
Manager (``CancelEvents``, the batch-wide stop today), the parent's end of the
channel (``Channel``, a Unix socket per worker, the single-role stop today),
and worker processes (spawned) that join the channel as a loky worker does.
Each waiting worker has a waiter thread blocked on the transport, as a loky
worker's is (``LokyBatch._watch_cancel_event`` on the event,
``_listen_to_parent`` on the channel); the latency is from the moment the
stop is set or sent to the moment a waiter thread in another process returns
with it (both read ``time.monotonic_ns()``, CLOCK_MONOTONIC, one clock for
every process on Linux). Ways measured:

  event, set by a worker      a worker whose role failed sets the Manager event (fail-fast today)
  event, set by the parent    the parent sets it (a signal, stop_all, today)
  channel, parent -> 1        a Cancel to the one worker running a role (a role's own timeout, today)
  channel, parent -> N        a Cancel to every worker (a channel-based stop_all)
  channel, worker -> parent   a worker tells the parent, whose reader thread queues it for its loop
    -> N                      thread (as the runner's inbox does), which sends a Cancel to every worker
                              (a channel-based fail-fast; the runner's own work in between is not in it)

The ways alternate within each repetition, so drift on a shared machine hits
them alike. "each" is one waiter's latency, "all" the time until the last of
the N waiters had it (what fail-fast waits for). Before each stop the script
pauses ``--pause`` seconds, so every waiter is blocked in its wait.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import socket
import statistics
import threading
import time
from multiprocessing.connection import Client, Connection
from typing import Any

from parroles.backends.loky.channel import Channel
from parroles.backends.loky.events import CancelEvents
from parroles.backends.loky.messages import CHANNEL_WIRE, Cancel, ChannelMessage, Hello
from parroles.backends.protocol import from_wire, to_wire

WAYS = ["event, set by a worker", "event, set by the parent", "channel, parent -> 1", "channel, parent -> N",
        "channel, worker -> parent -> N"]
SETTER = 0  # the worker that fails (it sets the event, or tells the parent); the waiters are 1..N


# -- a worker process ---------------------------------------------------------------------------


def worker_main(index: int, address: str, authkey: bytes, control: Connection) -> None:
    """A spawned worker: joins the channel, then waits (waiter) or stops the others (setter) as told."""
    channel = Client(address, authkey=authkey)
    channel.send_bytes(to_wire(Hello(os.getpid(), socket.gethostname(), index)))
    event = control.recv()  # the Manager event's proxy, unpickled here as a loky worker's payload is
    send_lock = threading.Lock()

    def report(*item: Any) -> None:
        with send_lock:
            control.send(item)

    armed: queue.SimpleQueue[bool] = queue.SimpleQueue()
    if index != SETTER:
        threading.Thread(target=_wait_on_event, args=(event, armed, report), daemon=True).start()
        threading.Thread(target=_listen_to_channel, args=(channel, report), daemon=True).start()
    while True:
        command = control.recv()
        if command == "arm":  # the next event stop: the waiter thread blocks on the event
            armed.put(True)
            report("armed")
        elif command == "set":  # the setter: fail-fast today
            t0 = time.monotonic_ns()
            event.set()
            report("sent", t0)
        elif command == "tell":  # the setter: a channel-based fail-fast, through the parent
            t0 = time.monotonic_ns()
            channel.send_bytes(to_wire(Cancel(0, "a role failed")))
            report("sent", t0)
        elif command == "quit":
            return


def _wait_on_event(event: Any, armed: queue.SimpleQueue[bool], report: Any) -> None:
    while armed.get():
        event.wait()
        report("seen", time.monotonic_ns())


def _listen_to_channel(channel: Connection, report: Any) -> None:
    try:
        while True:
            if isinstance(from_wire(channel.recv_bytes(), CHANNEL_WIRE), Cancel):
                report("seen", time.monotonic_ns())
    except (EOFError, OSError):
        return


# -- the parent ---------------------------------------------------------------------------------


class Bench:
    """The parent: a Manager, a channel, one setter and ``workers`` waiters."""

    def __init__(self, workers: int, pause: float) -> None:
        self.pause = pause
        self.events = CancelEvents(lambda detail: None)  # forks the Manager: before any thread of ours
        self.event = self.events.new()
        self.hello: dict[int, int] = {}  # slot index -> pid
        self.joined = threading.Condition()
        self.relay: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.channel = Channel(self._on_message, lambda pid: None)
        threading.Thread(target=self._loop, daemon=True).start()
        context = multiprocessing.get_context("spawn")
        self.controls: list[Connection] = []
        self.processes = []
        for index in range(workers + 1):
            mine, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(index, self.channel.address, self.channel.authkey,
                                                                theirs), daemon=True)
            process.start()
            mine.send(self.event)
            self.controls.append(mine)
            self.processes.append(process)
        with self.joined:
            if not self.joined.wait_for(lambda: len(self.hello) == workers + 1, timeout=60):
                raise RuntimeError("the workers did not join the channel within 60 s")
        self.waiters = [self.hello[i] for i in range(1, workers + 1)]

    def _on_message(self, pid: int, message: ChannelMessage) -> None:
        if isinstance(message, Hello):
            with self.joined:
                self.hello[message.slot] = pid
                self.joined.notify_all()
        elif isinstance(message, Cancel):
            self.relay.put(pid)  # the reader thread hands it to the loop thread, as the runner's inbox does

    def _loop(self) -> None:
        while True:
            self.relay.get()
            for pid in self.waiters:
                self.channel.send(pid, Cancel(0, "fail-fast"))

    def measure(self, way: str) -> list[float]:
        """One stop the ``way`` given; each waiter's latency in seconds (only the first waiter for parent -> 1)."""
        waiters = self.controls[1:2] if way == "channel, parent -> 1" else self.controls[1:]
        if way.startswith("event"):
            self.event.clear()
            for control in waiters:
                control.send("arm")
            for control in waiters:
                assert control.recv() == ("armed",)
        time.sleep(self.pause)  # so that every waiter is blocked in its wait (a benchmark's pause, not a test's)
        t0 = self._stop(way)
        seen = []
        for control in waiters:
            kind, t1 = control.recv()
            assert kind == "seen", kind
            seen.append((t1 - t0) / 1e9)
        return seen

    def _stop(self, way: str) -> int:
        setter = self.controls[SETTER]
        if way == "event, set by a worker":
            setter.send("set")
        elif way == "channel, worker -> parent -> N":
            setter.send("tell")
        else:
            t0 = time.monotonic_ns()
            if way == "event, set by the parent":
                self.event.set()
            else:
                for pid in self.waiters[:1] if way == "channel, parent -> 1" else self.waiters:
                    self.channel.send(pid, Cancel(0, "stop"))
            return t0
        kind, t0 = setter.recv()
        assert kind == "sent", kind
        return int(t0)

    def close(self) -> None:
        for control in self.controls:
            control.send("quit")
        for process in self.processes:
            process.join(timeout=10)
        self.channel.close()
        self.events.shutdown()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2, help="waiting workers (N), beside the one that stops")
    parser.add_argument("--pause", type=float, default=0.01, help="seconds before each stop")
    args = parser.parse_args()
    bench = Bench(args.workers, args.pause)
    each: dict[str, list[float]] = {way: [] for way in WAYS}
    last: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        for way in WAYS:  # a first round that is not counted: connections made, code paths warm
            bench.measure(way)
        for _ in range(args.reps):
            for way in WAYS:
                seen = bench.measure(way)
                each[way] += seen
                last[way].append(max(seen))
    finally:
        bench.close()
    print(f"stop latency, set or sent -> seen by a waiter thread in another process; N={args.workers}, "
          f"{args.reps} repetitions, {os.cpu_count()} CPUs; ms")
    print(f"{'way':32} {'each median':>11} {'each p90':>9} {'all median':>11} {'all p90':>8}")
    for way in WAYS:
        print(f"{way:32} {statistics.median(each[way]) * 1e3:11.3f} {percentile(each[way], 0.9) * 1e3:9.3f} "
              f"{statistics.median(last[way]) * 1e3:11.3f} {percentile(last[way], 0.9) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
