"""The README's picture of a report, made rather than drawn: docs/report.png.

    python scripts/report_screenshot.py                 # writes docs/report.png
    python scripts/report_screenshot.py --keep out/     # also keeps the reports and the ledger in out/

On a temporary ledger it runs examples/quickstart.toml, then a sweep whose largest learning rate
diverges (those runs FAIL; the role that needs every run of the sweep is CANCELLED), writes both
reports, and screenshots the sweep's in headless Chromium (``parroles.report.browser``: the package
playwright, from the test extra, and Debian's chromium: ``bash scripts/ensure-chromium.sh``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's parroles, as the commands below run it

from parroles.report import write_report  # noqa: E402
from parroles.report.browser import opened  # noqa: E402

SWEEP_ROLES = '''
"""A learning-rate sweep: fit y = 3x + 1 by stochastic gradient descent; too large a rate diverges."""
import random


def train(lr, seed, samples=4_000, epochs=150):
    rng = random.Random(seed)
    data = [(x, 3 * x + 1 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(samples))]
    w = b = 0.0
    for epoch in range(1, epochs + 1):
        rng.shuffle(data)
        for x, y in data:
            error = w * x + b - y
            w, b = w - lr * error * x, b - lr * error
        loss = sum((w * x + b - y) ** 2 for x, y in data) / len(data)
        if epoch <= 3 or epoch % 50 == 0 or not loss < 1e3:
            print(f"epoch {epoch}: loss {loss:.4g}, w {w:.4g}, b {b:.4g}", flush=True)
        if not loss < 1e3:
            raise FloatingPointError(f"loss {loss:.3g} at epoch {epoch}: lr={lr} diverges on this data")
    return {"lr": lr, "seed": seed, "w": round(w, 4), "b": round(b, 4), "loss": loss}


def summary(**_):
    import parroles

    fits = parroles.context().inputs
    return min(fits.values(), key=lambda fit: fit["loss"])
'''

SWEEP_SPEC = '''
[batch]
name = "sweep"
max_concurrent = 2

[[roles]]
name = "train"
call = "sweep_roles:train"
matrix = { lr = [0.01, 0.1, 1.5], seed = [1, 2] }

[[roles]]
name = "summary"
call = "sweep_roles:summary"
needs = ["train"]
'''


def parroles(ledger: Path, *args: str) -> str:
    """Run a parroles command on ``ledger``; its last line names the batch (``batch <id> in <ledger>``)."""
    done = subprocess.run([sys.executable, "-m", "parroles", *args, "--ledger", str(ledger), "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=ledger.parent)
    if done.returncode not in (0, 1):
        raise SystemExit(f"parroles {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1].split()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png", help="the PNG to write")
    parser.add_argument("--keep", type=Path, help="a folder to keep the reports and the ledger in")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parroles-screenshot-") as tmp:
        folder = Path(tmp)
        (folder / "sweep_roles.py").write_text(textwrap.dedent(SWEEP_ROLES))
        (folder / "sweep.toml").write_text(SWEEP_SPEC)
        ledger = folder / "ledger.duckdb"
        quickstart = parroles(ledger, "run", str(ROOT / "examples" / "quickstart.toml"))
        sweep = parroles(ledger, "run", str(folder / "sweep.toml"))
        reports = [write_report(ledger, batch, folder / f"{batch}.html") for batch in (quickstart, sweep)]
        with opened(reports[1], width=1200, height=900) as looked:
            if looked.errors:
                raise SystemExit(f"the report logged errors: {looked.errors}")
            looked.page.screenshot(path=str(args.out), full_page=True)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in [*reports, ledger]:
                shutil.copy(path, args.keep / path.name)
    print(f"{args.out}: the report of a failing sweep (batch {sweep})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
