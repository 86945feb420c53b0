import json

from anyorder.cli import main


def test_federated_command_writes_the_report(tmp_path, capsys):
    out = tmp_path / "fed"
    rc = main(
        ["federated", "--rounds", "2", "--seeds", "0,1", "--num-clients", "4",
         "--local-steps", "2", "--algorithms", "fedavg,fedspeed,dfedsam,fedfix", "--out",
         str(out), "--quiet"]
    )  # fmt: skip
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {
        "results.json", "results.csv", "accuracy.png", "index.html"
    }  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    assert [s["algorithm"] for s in data["summary"]] == ["fedavg", "fedspeed", "dfedsam", "fedfix"]
    assert all(s["seeds"] == 2 for s in data["summary"])
    assert data["spectral_gap"] is not None and 0 < data["spectral_gap"] <= 1
    run = data["runs"][0]
    assert len(run["accuracy"]) == 2 and run["bytes_per_round"][0] > 0
    assert sum(data["partitions"]["0"]["sizes"]) == 1438  # 80% of the 1,797 digits
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4 * 2 * 2
    assert "fedspeed" in capsys.readouterr().out


def test_federated_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    for argv in (["--lr", "0"], ["--algorithms", "fedfoo"], ["--seeds", "a,b"],
                 ["--participation", "1.5"], ["--dropout", "1"]):  # fmt: skip
        out = tmp_path / "x"
        assert main(["federated", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("anyorder: error:")
        assert not out.exists()


def test_federated_help(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["federated", "--help"])
    assert info.value.code == 0
    assert "--participation" in capsys.readouterr().out


def test_federated_command_runs_fedzo_on_seeds_and_scalars(tmp_path):
    out = tmp_path / "zo"
    argv = ["federated", "--rounds", "2", "--seeds", "0", "--num-clients", "4", "--local-steps",
            "2", "--algorithms", "fedavg,fedzo", "--zo-queries", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    runs = {r["algorithm"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    # an upload is 2 steps x 2 queries of (4-byte seed, 4-byte scalar) + an 8-byte example count,
    # against FedAvg's whole model (64*64 + 64 + 64*10 + 10 float32 values)
    assert runs["fedzo"]["up_bytes_per_client_round"] == 2 * 2 * 8 + 8
    assert runs["fedavg"]["up_bytes_per_client_round"] >= 4 * (64 * 64 + 64 + 64 * 10 + 10)
    assert json.loads((out / "results.json").read_text())["config"]["zo_queries"] == 2
