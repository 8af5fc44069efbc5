"""``parroles report`` and ``parroles diff`` on real batches, the report looked at in headless Chromium.

The browser is the system's Chromium (``bash scripts/ensure-chromium.sh``), driven by playwright; when
either is missing these tests fail, saying what to install: they never skip. No timing is asserted here:
how fast a 10,000-run report opens is a row of scripts/bench.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import report_roles as R
from click.testing import CliRunner

import parroles
from parroles import Role
from parroles.cli import cli
from parroles.errors import ConfigError, RunNotFoundError
from parroles.report import browser

MAX_BYTES = 5 * 1024 * 1024
BIG = 10_000


def pipeline(epochs: int) -> list[Role]:
    return [Role("prepare", R.prepare),
            Role(R.HOSTILE, R.shout, needs=["prepare"]),
            *Role("train", R.train, params={"epochs": epochs}, needs=["prepare"]).expand(lr=[0.1, 0.2], seed=[1, 2]),
            Role("breaks", R.breaks, needs=["prepare"]),
            Role("after", R.noop, needs=["breaks"])]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two batches of one pipeline, the second with one param changed (a matrix role's epochs)."""
    path = tmp_path_factory.mktemp("report") / "ledger.duckdb"
    for epochs in (2, 3):
        batch = parroles.run(pipeline(epochs), ledger=path, name=f"epochs{epochs}", max_concurrent=2)
        assert not batch.ok and batch.by_role["after"].status.value == "CANCELLED"
    parroles.shutdown_workers()
    return path


@pytest.fixture(scope="module")
def big_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    batch = parroles.run([f"r{i}" for i in range(BIG)], R.noop, ledger=folder / "big.duckdb", name="big",
                         max_concurrent=2)
    parroles.shutdown_workers()
    assert batch.ok
    return parroles.write_report(folder / "big.duckdb", batch.batch_id, folder / "big.html")


@contextlib.contextmanager
def look(path: Path) -> Iterator[browser.OpenedPage]:
    """The report open in Chromium; a missing browser or playwright fails the test, saying what to install."""
    try:
        with browser.opened(path) as opened:
            yield opened
    except ConfigError as exc:
        pytest.fail(str(exc))


def invoke(*args: str) -> tuple[int, str]:
    done = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return done.exit_code, done.output


def text_of(opened: browser.OpenedPage) -> str:
    """Everything the page holds as text, hidden rows included (textContent, not innerText)."""
    return str(opened.page.evaluate("document.body.textContent"))


def test_the_report_shows_every_run_offline_and_runs_no_script_of_the_batchs(ledger, tmp_path):
    out = parroles.write_report(ledger, "epochs2", tmp_path / "r.html")
    with look(out) as opened:
        text = text_of(opened)
        for role in ["prepare", R.HOSTILE, "breaks", "after", "train[lr=0.1,seed=1]", "train[lr=0.2,seed=2]"]:
            assert role in text, role
        assert opened.page.evaluate("window.pwned") is None  # the name, the error, the output: shown, not run
        assert "<b>bad</b> & worse" in text and '<img src="x" onerror="window.pwned = 2">' in text
        assert opened.requests == [out.resolve().as_uri()]
        assert opened.errors == []
        assert opened.page.locator("svg.timeline rect").count() >= 8
        assert opened.page.locator("svg.graph .node").count() == 8
        assert opened.page.locator(".failure").count() == 2  # breaks FAILED, after CANCELLED
        assert "about to fail" in opened.page.locator(".failure").first.inner_text()  # the last lines it wrote
        assert opened.page.locator("table.grid td.cell").count() == 4  # train by lr and seed


def test_a_cancelled_role_keeps_its_need_though_nothing_was_handed(ledger):
    from parroles.ledger import Ledger
    from parroles.report.data import read_batch

    with Ledger(ledger, read_only=True) as opened:
        view = read_batch(opened, "epochs2")
    kinds = {(need.needed, need.needing): need.kind for need in view.needs}
    assert kinds[("prepare", "breaks")] == "handoff"
    assert ("breaks", "after") in kinds  # after never started: known by how it was cancelled
    assert kinds[("prepare", R.HOSTILE)] == "handoff"


def test_a_spec_batchs_needs_come_from_its_spec(tmp_path):
    (tmp_path / "spec_roles.py").write_text("def ok():\n    return 1\n\ndef bad():\n    raise RuntimeError('no')\n")
    (tmp_path / "s.toml").write_text('[batch]\nname = "s"\n[[roles]]\nname = "bad"\ncall = "spec_roles:bad"\n'
                                     '[[roles]]\nname = "mid"\ncall = "spec_roles:ok"\nneeds = ["bad"]\n'
                                     '[[roles]]\nname = "end"\ncall = "spec_roles:ok"\nneeds = ["mid"]\n')
    ledger = tmp_path / "l.duckdb"
    assert invoke("run", str(tmp_path / "s.toml"), "--ledger", str(ledger), "-q")[0] == 1
    from parroles.ledger import Ledger
    from parroles.report.data import read_batch

    with Ledger(ledger, read_only=True) as opened:
        view = read_batch(opened, "s-")
    assert {(n.needed, n.needing, n.kind) for n in view.needs} == {("bad", "mid", "need"), ("mid", "end", "need")}
    assert "spec file" in view.needs_from


def test_reused_runs_are_marks_on_the_lane_of_runs_that_held_no_slot(ledger, tmp_path):
    again = parroles.run(pipeline(3), ledger=ledger, name="again", max_concurrent=2, reuse=True)
    reused = [result for result in again if result.reason is parroles.Reason.REUSED]
    assert reused and not any(result.role == "after" for result in reused)
    from parroles.ledger import Ledger
    from parroles.report.data import read_batch
    from parroles.report.drawing import timeline

    with Ledger(ledger, read_only=True) as opened:
        lanes = timeline(read_batch(opened, again.batch_id)).lanes
    *slots, last = lanes
    assert last.never_ran and len(last.bars) == len(reused) + 1  # and after, cancelled before it started
    assert sum(len(lane.bars) for lane in slots) == 1  # breaks, the one that ran (and failed again)


def test_sorting_by_a_heading_orders_the_rows(ledger, tmp_path):
    out = parroles.write_report(ledger, "epochs2", tmp_path / "r.html")
    with look(out) as opened:
        page = opened.page
        durations = "Array.from(document.querySelectorAll('#runs-table tbody tr')).map(r => r.cells[4].dataset.v)"
        page.click("#runs-table th:nth-child(5)")
        ascending = [float(v) for v in page.evaluate(durations) if v]
        assert ascending == sorted(ascending) and len(ascending) >= 6
        assert page.evaluate(durations)[-1] == ""  # the run that never ran has no duration: last
        page.click("#runs-table th:nth-child(5)")
        descending = [float(v) for v in page.evaluate(durations) if v]
        assert descending == sorted(ascending, reverse=True)
        page.click("#runs-table th:nth-child(2)")
        roles = page.evaluate("Array.from(document.querySelectorAll('#runs-table tbody tr')).map(r => r.cells[1].textContent)")
        assert roles[0] == R.HOSTILE and roles[1] == "after"  # '<' sorts first, then by name
        assert opened.errors == []


def test_a_report_of_ten_thousand_runs_is_small_and_renders_whole(big_report):
    assert big_report.stat().st_size <= MAX_BYTES
    with look(big_report) as opened:
        assert opened.page.locator("#runs-table tbody tr").count() == BIG
        assert opened.page.locator("svg.timeline .bars rect").count() == BIG
        text = text_of(opened)
        assert "r0" in text and f"r{BIG - 1}" in text
        opened.page.click(".more button[data-more=all]")  # every row shown, laid out, on request
        assert opened.page.locator("#runs-table tbody tr:not([hidden])").count() == BIG
        assert opened.requests == [big_report.resolve().as_uri()] and opened.errors == []


def test_the_report_command_writes_its_default_file_and_says_where(ledger, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = invoke("report", "epochs3", "--ledger", str(ledger))
    (written,) = tmp_path.glob("parroles-report-epochs3-*.html")
    assert code == 0 and output.strip() == written.name
    assert "Compared with" not in written.read_text()
    code, output = invoke("report", "epochs3", "--against", "epochs2", "-o", "against.html", "--ledger", str(ledger))
    page = (tmp_path / "against.html").read_text()
    assert code == 0 and "Compared with epochs2-" in page and "4 params changed" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([written.name, "against.html"])  # no temp file


def test_unknown_batches_and_unwritable_files_are_one_line_errors(ledger, tmp_path):
    for args in (["report", "nope"], ["diff", "epochs2", "nope"], ["report", "epochs2", "--against", "nope"]):
        code, output = invoke(*args, "--ledger", str(ledger))
        assert code == RunNotFoundError.exit_code and output.startswith("parroles: error: no batch nope"), output
    code, output = invoke("report", "epochs", "--ledger", str(ledger))  # the start of two ids
    assert code == ConfigError.exit_code and "more than one batch" in output
    code, output = invoke("report", "epochs2", "-o", str(tmp_path / "no" / "such" / "r.html"), "--ledger", str(ledger))
    assert code == ConfigError.exit_code and output.count("\n") == 1 and "cannot write" in output
    assert not (tmp_path / "no").exists()


def test_diff_matches_roles_by_name_and_sums_it_up_in_a_line(ledger):
    code, output = invoke("diff", "epochs2", "epochs3", "--ledger", str(ledger))
    assert code == 0
    lines = output.splitlines()
    assert lines[-1] == "4 outputs changed, 4 params changed"  # its roles take ms: not counted slower or faster
    assert any(line.startswith("train[lr=0.1,seed=1]") and "changed" in line for line in lines)
    code, output = invoke("diff", "epochs2", "epochs3", "--json", "--ledger", str(ledger))
    found = json.loads(output)
    by_role = {change["role"]: change for change in found["changes"]}
    assert set(by_role) == {"prepare", R.HOSTILE, "breaks", "after", *(f"train[lr={lr},seed={seed}]"
                                                                        for lr in (0.1, 0.2) for seed in (1, 2))}
    assert by_role["train[lr=0.2,seed=2]"]["params_changed"] and by_role["train[lr=0.2,seed=2]"]["output_changed"]
    assert not by_role["prepare"]["params_changed"] and by_role["prepare"]["output_changed"] is False
    assert by_role["breaks"]["output_changed"] is None and by_role["breaks"]["ratio"] is None
    assert found["counts"]["params changed"] == 4
    assert found["summary"] == parroles.diff_batches(ledger, "epochs2", "epochs3").summary()


def test_without_chromium_the_browser_tests_fail_saying_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="install Debian's package chromium: bash scripts/ensure-chromium.sh"):
        browser.chromium()
    with pytest.raises(pytest.fail.Exception, match="ensure-chromium"):
        with look(tmp_path / "r.html"):
            pass


def test_a_matrix_cells_output_is_text_in_its_title_never_attributes(tmp_path):
    from html.parser import HTMLParser

    batch = parroles.run(Role("m", R.attributes).expand(x=[1, 2], y=[3, 4]), ledger=tmp_path / "l.duckdb",
                         name="cells")
    written = parroles.write_report(tmp_path / "l.duckdb", batch.batch_id, tmp_path / "r.html")
    cells: list[dict[str, str | None]] = []

    class Cells(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "td" and "cell" in (dict(attrs).get("class") or ""):
                cells.append(dict(attrs))

    Cells().feed(written.read_text(encoding="utf-8"))
    assert len(cells) == 4
    for cell in cells:
        assert set(cell) == {"class", "title"}, cell
        assert cell["title"].endswith(json.dumps(R.ATTRIBUTES, ensure_ascii=False)), cell["title"]


def test_a_link_is_written_through_and_a_fifo_is_written_to_never_replaced(ledger, tmp_path):
    import os
    import stat
    import threading

    (tmp_path / "real.html").write_text("old")
    (tmp_path / "link.html").symlink_to(tmp_path / "real.html")
    parroles.write_report(ledger, "epochs2", tmp_path / "link.html")
    assert (tmp_path / "link.html").is_symlink() and "<html" in (tmp_path / "real.html").read_text()

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text(encoding="utf-8")))
    reader.start()
    parroles.write_report(ledger, "epochs2", fifo)  # as /dev/null or /dev/stdout would be
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and "<html" in read[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.html", "real.html"]  # no temp file left
