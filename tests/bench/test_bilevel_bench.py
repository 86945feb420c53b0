"""``anyorder bilevel``: a tiny run writes the report; bad input exits 2 and writes nothing."""

from __future__ import annotations

import csv
import json

from anyorder.bench.bilevel import run_bilevel_suite, write_bilevel_report
from anyorder.cli import main


def test_tiny_suite_writes_report(tmp_path):
    result = run_bilevel_suite(["logistic-l2"], ["AID", "BOREP"], [0], steps=2, eval_every=1,
                               log=lambda m: None)
    paths = write_bilevel_report(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    runs = {r["algorithm"]: r for r in data["runs"]}
    assert set(runs) == {"AID", "BOREP"}
    assert runs["AID"]["time_ratio_vs_aid"] == 1.0
    assert [h["iteration"] for h in runs["BOREP"]["history"]] == [0, 1, 2]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 2 and rows[0]["metric_name"] == "val_loss"
    assert paths["plot:logistic-l2"].stat().st_size > 1000
    assert "logistic-l2" in paths["html"].read_text()


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bilevel", "--problems", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown problem 'nope'" in err[0]
    assert main(["bilevel", "--algorithms", "SGD", "--out", str(out)]) == 2
    assert main(["bilevel", "--seeds", "-1", "--out", str(out)]) == 2
    assert not out.exists()
