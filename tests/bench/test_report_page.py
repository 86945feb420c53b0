"""The seeded report page: structure (always) and a real headless browser's view of it (where
Chromium is installed; CI installs it)."""

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from anyorder.bench.report import write_report
from anyorder.bench.runner import HistoryPoint, RunResult, SuiteResult

OPTIMIZERS = [f"opt{i:02d}" for i in range(13)]  # as many as the registry has
TASKS = ("alpha", "beta")
SEEDS = (0, 1, 2)


def _run(task, opt, seed, rate):
    history = [
        HistoryPoint(i, 2.0 * math.exp(-rate * i) + 0.01 * ((seed + i) % 3), 0.01 * (i + 1),
                     i + 1, i + 1)  # fmt: skip
        for i in range(60)
    ]
    return RunResult(
        task=task, optimizer=opt, hyperparameters={"lr": 0.1}, task_options={}, seed=seed,
        steps=60, steps_requested=60, time_budget_s=None,
        final_loss=history[-1].loss, metric_name="accuracy", metric=0.5 + rate,
        higher_is_better=True, time_per_step_s=0.01, total_time_s=0.6, inference_time_s=0.001,
        peak_memory_bytes=100, inference_peak_memory_bytes=10, forward_evals=60,
        backward_evals=60, forward_evals_per_step=1.0, backward_evals_per_step=1.0,
        diverged=False, history=history,
        budget={"kind": "steps", "steps": 60, "seconds": None, "evaluations": None,
                "backward_cost": 2.0},
    )  # fmt: skip


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    runs = [
        _run(task, opt, seed, 0.01 + 0.01 * ((i + 5 * t) % 13) + 0.002 * seed)
        for seed in SEEDS
        for t, task in enumerate(TASKS)
        for i, opt in enumerate(OPTIMIZERS)
    ]
    result = SuiteResult("0", "2026-01-01T00:00:00+00:00", {"cpu_count": 2}, "quick", 0, "cpu",
                         runs, list(SEEDS))  # fmt: skip
    out = tmp_path_factory.mktemp("report")
    write_report(result, out)
    return out


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.imgs, self.best_rows, self.ranking_rows = set(), [], [], 0, 0
        self._table = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._table = a.get("id")
        if tag == "a" and a.get("href", "").startswith("#"):
            self.hrefs.append(a["href"][1:])
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "tr" and a.get("class") == "best":
            self.best_rows += 1
        if tag == "tr" and self._table == "ranking":
            self.ranking_rows += 1


def test_page_links_every_task_highlights_the_best_and_ranks_all(report_dir):
    page = _Collect()
    page.feed((report_dir / "index.html").read_text())
    assert {f"task-{t}" for t in TASKS} <= set(page.hrefs)
    assert set(page.hrefs) <= page.ids  # every summary link lands on a section
    assert page.best_rows == len(TASKS)
    assert page.ranking_rows == 1 + len(OPTIMIZERS)  # header + one per optimizer
    for src in page.imgs:
        assert (report_dir / src).stat().st_size > 1000
    assert "http" not in " ".join(page.imgs)  # static: nothing fetched from the network
    summary = json.loads((report_dir / "summary.json").read_text())
    # the fastest-decaying curves win: opt12 on alpha, opt07 on beta (rate index 12)
    assert summary["tasks"]["alpha"]["best_optimizer"] == "opt12"
    assert summary["tasks"]["beta"]["best_optimizer"] == "opt07"


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium installed: the headless-browser check of the report is skipped "
                "(apt-get install -y chromium; CI installs it)")  # fmt: skip


def _dump_dom(browser, page):
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_headless_browser_loads_every_figure(report_dir, tmp_path):
    browser = _chromium()
    dom = _dump_dom(browser, report_dir / "index.html")
    assert 'data-images-ok="yes"' in dom
    assert dom.count('id="task-') == len(TASKS)
    # the check can fail: the same page without one of its figures is flagged
    broken = tmp_path / "broken"
    shutil.copytree(report_dir, broken)
    (broken / "profiles.png").unlink()
    assert 'data-images-ok="no"' in _dump_dom(browser, broken / "index.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
         "--virtual-time-budget=5000", f"--screenshot={shot}", (report_dir / "index.html").as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 20_000  # a rendered page with figures, not a blank one
