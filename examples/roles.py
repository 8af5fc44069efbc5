"""The examples' roles, each doing real CPU-bound work of its kind in plain Python.

Each is called with its spec ``params`` as keyword arguments and may use
``parroles.context()`` to emit events, to notice a cancellation, and to read
what the roles it needs handed it (``context().inputs``: the quickstart's
planner -> coder -> reviewer | tester -> fixer, and the sweep's report).
"""

from __future__ import annotations

import ast
import hashlib
import random
import time

import parroles
from parroles import Code, Fix, Plan, Review, TestReport


def plan(goal: str, size: int = 150_000) -> Plan:
    """Decompose: factor a range of numbers and turn the factor groups into a task list."""
    ctx = parroles.context()
    groups: dict[int, int] = {}
    for n in range(2, size):
        m, smallest = n, None
        d = 2
        while d * d <= m:
            while m % d == 0:
                smallest = smallest or d
                m //= d
            d += 1
        groups[smallest or m] = groups.get(smallest or m, 0) + 1
        if n % 20_000 == 0:
            ctx.emit("progress", {"factored": n})
            ctx.check_cancelled()
    top = sorted(groups, key=groups.get, reverse=True)[:4]
    tasks = [f"{goal}: part {i + 1} (factor {p}, {groups[p]} items)" for i, p in enumerate(top)]
    return Plan(tasks, len(tasks), [f"/tasks/{i}" for i in range(len(tasks))])


def code(files: int = 40, rounds: int = 120_000) -> Code:
    """Compute and hash: generate source files for the planner's tasks and seal each with a chained SHA-256."""
    ctx = parroles.context()
    plan: Plan | None = ctx.inputs.get("planner")
    tasks = plan.task_breakdown if plan is not None else ()
    digest = hashlib.sha256("\n".join(tasks).encode())  # the code is sealed to the plan it implements
    names = []
    for f in range(files):
        text = "\n".join(f"def f{f}_{i}(x):\n    return x * {i} + {f}\n" for i in range(60))
        seal = text.encode()
        for _ in range(rounds // files * 10):
            seal = hashlib.sha256(seal).digest()
        digest.update(seal)
        names.append(f"src/module_{f}.py")
        ctx.check_cancelled()
    ctx.emit("sealed", {"files": files})
    return Code(digest.hexdigest(), names, notes=f"{files} generated modules for {len(tasks)} planned tasks")


def review(modules: int = 3_000) -> Review:
    """Check: parse the coder's modules and flag functions with too many branches."""
    code: Code | None = parroles.context().inputs.get("coder")
    files = code.files_modified if code is not None else ("module.py",)
    comments = []
    for m in range(modules):
        body = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(m % 25))
        tree = ast.parse(f"def check_{m}(x):\n{body or '    pass'}\n    return -1\n")
        branches = sum(isinstance(node, ast.If) for node in ast.walk(tree))
        if branches > 23:
            comments.append(f"{files[m % len(files)]}: check_{m}: {branches} branches")
    return Review(approved=not comments, comments=comments, requires_fix=bool(comments))


def test(cases: int = 1_000, length: int = 400, seed: int = 7) -> TestReport:
    """Test a property: a hand-written merge sort agrees with sorted() on random lists (seeded by the code)."""
    ctx = parroles.context()
    code: Code | None = ctx.inputs.get("coder")
    rng = random.Random(f"{seed}:{code.patch_digest}" if code is not None else seed)
    failed = []
    for case in range(cases):
        data = [rng.randint(-1000, 1000) for _ in range(length)]
        if merge_sort(data) != sorted(data):
            failed.append(f"case {case}")
        if case % 100 == 0:
            ctx.check_cancelled()
    return TestReport(passed=not failed, total_cases=cases, failed_cases=failed)


def fix(issues: int = 150, work: int = 30_000) -> Fix:
    """Merge the reviewer's and the tester's verdicts, then resolve what they found: search a nonce whose
    digest starts with zeros for each issue (alone, without their inputs: ``issues`` made-up ones)."""
    ctx = parroles.context()
    review: Review | None = ctx.inputs.get("reviewer")
    report: TestReport | None = ctx.inputs.get("tester")
    if review is not None and report is not None:
        verdict = parroles.merge_review_and_tests(review, report)
        ctx.emit("verdict", {"verdict": verdict.value, "review_comments": len(review.comments),
                             "failed_cases": len(report.failed_cases)})
        found = [] if verdict is parroles.Verdict.APPROVED else [*review.comments, *report.failed_cases]
    else:
        found = [f"issue-{issue}" for issue in range(issues)]
    digest = hashlib.sha256()
    for issue in found:
        nonce = 0
        while not hashlib.sha256(f"{issue}:{nonce}".encode()).hexdigest().startswith("000"):
            nonce += 1
            if nonce > work:
                break
        digest.update(f"{issue}:{nonce}".encode())
        ctx.check_cancelled()
    return Fix(digest.hexdigest(), found)


def merge_sort(items: list[int]) -> list[int]:
    if len(items) <= 1:
        return list(items)
    middle = len(items) // 2
    left, right = merge_sort(items[:middle]), merge_sort(items[middle:])
    merged, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            merged.append(left[i])
            i += 1
        else:
            merged.append(right[j])
            j += 1
    return merged + left[i:] + right[j:]


def flaky_test(seconds: float = 1.5) -> TestReport:
    """A tester that tests for a while, then finds a failing case and fails its role (the fail-fast example).

    The while is real work and gives the reviewer's worker time to boot, so the
    reviewer is running when the failure cancels it.
    """
    ctx = parroles.context()
    rng, cases, started = random.Random(7), 0, time.monotonic()
    while time.monotonic() - started < seconds:
        data = [rng.randint(-1000, 1000) for _ in range(400)]
        assert merge_sort(data) == sorted(data)
        cases += 1
        ctx.check_cancelled()
    raise AssertionError(f"property failed after {cases} cases: a reviewer's fix is needed")


def long_review(seconds_of_work: int = 60) -> Review:
    """A reviewer that works until told to stop, checking cancelled() as it goes."""
    ctx = parroles.context()
    checked = 0
    while checked < seconds_of_work * 200_000:
        hashlib.sha256(str(checked).encode()).digest()
        checked += 1
        if checked % 20_000 == 0:
            ctx.check_cancelled()
    return Review(True, [], False)


def train(lr: float, seed: int, samples: int = 2_000, epochs: int = 60) -> dict[str, float]:
    """The sweep's unit: fit y = 3x + 1 to noisy samples by stochastic gradient descent, in plain Python."""
    ctx = parroles.context()
    rng = random.Random(seed)
    data = [(x, 3 * x + 1 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(samples))]
    w = b = 0.0
    for _ in range(epochs):
        rng.shuffle(data)
        for x, y in data:
            error = w * x + b - y
            w, b = w - lr * error * x, b - lr * error
        ctx.check_cancelled()
    loss = sum((w * x + b - y) ** 2 for x, y in data) / len(data)
    ctx.emit("fitted", {"epochs": epochs, "loss": loss})
    return {"lr": lr, "seed": seed, "w": w, "b": b, "loss": loss}


def report() -> dict[str, object]:
    """The sweep's fan-in: every expansion of ``train`` handed its fit here; rank them by loss."""
    fits = parroles.context().inputs
    ranked = sorted(fits, key=lambda name: fits[name]["loss"])
    return {"best": ranked[0], "best_loss": fits[ranked[0]]["loss"], "ranked": ranked}
