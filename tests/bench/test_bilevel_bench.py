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


def test_lvhba_ball_projection_keeps_y_on_the_ball_and_leaves_x():
    import torch

    from anyorder.bench.bilevel import ball_constraint, ball_projection

    y = [torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([12.0], dtype=torch.float64)]
    x = [torch.tensor([100.0])]
    project = ball_projection(25.0)
    project(x, y)  # ||y||^2 = 169 -> scaled by 5/13 onto the ball
    assert torch.allclose(torch.cat(y), torch.tensor([15, 20, 60], dtype=torch.float64) / 13)
    assert abs(float(ball_constraint(y, 25.0)())) < 1e-12 and x[0].item() == 100.0
    inside = [torch.tensor([1.0, 2.0])]
    project(x, inside)  # already feasible: untouched
    assert inside[0].tolist() == [1.0, 2.0]


def test_lvhba_on_digits_cleaning_holds_the_constraint_instead_of_failing():
    """Without the projection onto C, LV-HBA (inner L2 1e-3) failed at step 790 on digits seed
    2: y left the ball, lam grew to 6e11. In a shortened form (a ball y reaches within a few
    dozen steps): without the projection the run fails; with it y stays on the ball."""
    import pytest

    from anyorder.bench.bilevel import PROBLEMS, ball_constraint, ball_projection
    from anyorder.bilevel import LVHBA
    from anyorder.bilevel.problems import HyperCleaning, load_cleaning_data

    hp = PROBLEMS["hypercleaning-digits-linear"].hparams["LVHBA"]
    radius_sq = 4.0

    def run(project):
        prob = HyperCleaning(load_cleaning_data("digits", n_train=200, n_val=100, seed=2),
                             seed=2, reg=1e-3)
        extra = {} if project is None else {"project": project}
        opt = LVHBA([prob.weights], prob.params, **hp, **extra)
        g = ball_constraint(prob.params, radius_sq)
        for _ in range(100):
            opt.step(prob.inner_loss, prob.outer_loss, g)
        return prob

    with pytest.raises(FloatingPointError, match="non-finite"):
        run(None)
    prob = run(ball_projection(radius_sq))
    norm_sq = float(sum(p.detach().square().sum() for p in prob.params))
    assert abs(norm_sq - radius_sq) < 1e-4  # reached the ball and held there
    assert prob.metrics()["test_accuracy"] > 0.6  # a working (if small) classifier

def _mlp_cleaning_f1(hp: dict, checkpoints: tuple[int, ...]) -> list[float]:
    """AID on a small digits MLP hyper-cleaning problem (300 / 150 / 200, 32 hidden units,
    seed 1): the detection F1 at the given outer steps."""
    import torch

    from anyorder.bilevel import AID
    from anyorder.bilevel.problems import HyperCleaning, load_cleaning_data

    data = load_cleaning_data("digits", n_train=300, n_val=150, n_test=200, seed=1)
    prob = HyperCleaning(data, model="mlp", hidden=32, seed=1)
    opt = AID([prob.weights], prob.params, **hp)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: extra threads only wait on each other
    try:
        for k in range(1, max(checkpoints) + 1):
            opt.step(prob.inner_loss, prob.outer_loss)
            if k in checkpoints:
                out.append(prob.detection_f1())
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(prob.weights).all()
    return out


def test_mlp_hypercleaning_settings_neither_start_blind_nor_collapse():
    """The suite's AID settings on the MLP problem detect the corrupted labels from the first
    step (the inner warm-up: F1 0.86 at step 1, 0.72 without it) and keep detecting them (the
    cold-started adjoint): F1 >= 0.9 at outer steps 25 and 100; with the warm-started adjoint
    F1 is 0.86 at step 100. (Before AID's ``"auto"`` adjoint re-solved with MINRES when CG
    overshoots, the warm-started adjoint collapsed to F1 0.59 at step 100 and the run without
    the warm-up was still at 0.81 at step 25; with that guard it reaches 0.92 there.)"""
    from anyorder.bench.bilevel import PROBLEMS

    hp = PROBLEMS["hypercleaning-digits-mlp"].hparams["AID"]
    assert hp["init_steps"] > 0 and hp["warm_start_adjoint"] is False
    first, *later = _mlp_cleaning_f1(hp, (1, 25, 100))
    assert first >= 0.83 and min(later) >= 0.9
    # the bounds are ones the old settings miss (so the test can fail)
    assert _mlp_cleaning_f1({**hp, "init_steps": 0}, (1,))[0] < 0.78
    assert _mlp_cleaning_f1({**hp, "warm_start_adjoint": True}, (100,))[0] < 0.9


def test_mnist_mlp_inner_steps_are_below_gradient_descents_stability_limit():
    """On MNIST the MLP's inner Hessian has a top eigenvalue of ~4 after the warm-up (~1.5 on
    digits): the digits inner step 1.0 is above gradient descent's limit 2 / lambda_max, the
    inner iterate bounces (||grad_y G|| ~0.35) where the Hessian is indefinite, and AID's
    implicit hypergradient is wrong there. The suite's MNIST-MLP steps (AID's warm-up and inner
    step, LV-HBA's y and theta steps) stay below the limit and the warm-up ends near a
    stationary point (seed 3, one of the two seeds the settings were chosen on)."""
    import pytest
    import torch

    pytest.importorskip("mlxtend")
    from anyorder.bench.bilevel import PROBLEMS
    from anyorder.bilevel import AID
    from anyorder.bilevel._base import MixedHessian
    from anyorder.bilevel.problems import HyperCleaning, load_cleaning_data
    from anyorder.hessian.lanczos import eigenvalues
    from anyorder.hessian.operators import CurvatureOperator, flatten, unflatten

    hps = PROBLEMS["hypercleaning-mnist-mlp"].hparams
    prob = HyperCleaning(load_cleaning_data("mnist", seed=3), model="mlp", seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the warm-up alone: outer lr 0, no inner steps after it
        opt = AID([prob.weights], prob.params, **{**hps["AID"], "lr": 0.0, "inner_steps": 0})
        opt.step(prob.inner_loss, prob.outer_loss)
        with torch.enable_grad():
            grad = torch.autograd.grad(prob.inner_loss(), prob.params)
            hess = MixedHessian(prob.inner_loss, [prob.weights], prob.params)

            class InnerHessian(CurvatureOperator):
                size = sum(p.numel() for p in prob.params)
                dtype, device = prob.params[0].dtype, prob.params[0].device

                def _matmat(self, vs):
                    return torch.stack([flatten(hess.hyy(unflatten(v, prob.params))) for v in vs])

            top = eigenvalues(InnerHessian(), which="largest", tol=1e-2, max_iter=60).eigenvalues[0]
    finally:
        torch.set_num_threads(threads)
    assert 3.0 < top < 6.0  # measured 4.3
    assert float(torch.sqrt(sum(g.square().sum() for g in grad))) < 0.05  # measured 0.018
    steps = [hps["AID"]["inner_lr"], hps["LVHBA"]["inner_lr"], hps["LVHBA"]["theta_lr"]]
    assert max(steps) * top < 1.5
    assert 1.0 * top > 2.0  # the digits step 1.0 is above the limit here
