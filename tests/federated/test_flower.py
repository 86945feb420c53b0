"""The Flower adapter in one process (fast) and on Flower's deployment engine (slow)."""

from __future__ import annotations

import copy

import pytest
import torch
from fed_reference import make_problem
from torch import nn

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from anyorder.federated import flatten  # noqa: E402
from anyorder.federated.algorithm import ClientContext, client_generator  # noqa: E402
from anyorder.federated.fedspeed import FedSpeed  # noqa: E402
from anyorder.federated.flower import (  # noqa: E402
    FedSpeedStrategy,
    algorithm_client_app,
    from_record,
    optimizer_client_app,
    to_record,
)
from anyorder.federated.simulator import Simulator  # noqa: E402
from anyorder.optim import ZOSGD  # noqa: E402


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's Message needs the run id of the process it runs in (set by its runtime)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    torch.set_num_threads(threads)


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _contexts(n):
    return {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i},
                             state=RecordDict(), run_config={}) for i in range(n)}  # fmt: skip


def test_records_round_trip_exactly():
    payload = {"pairs": torch.arange(7, dtype=torch.uint8), "n": torch.tensor(5),
               "model": torch.randn(3, 2, dtype=torch.float64)}  # fmt: skip
    back = from_record(to_record(payload))
    assert back.keys() == payload.keys()
    for k, v in payload.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with pytest.raises(TypeError, match="not a tensor"):
        to_record({"x": [1, 2]})


def test_fedspeed_strategy_and_client_app_equal_the_simulator_bit_for_bit():
    data, model = make_problem()
    alg = FedSpeed(local_steps=2, batch_size=4, lr=0.1)
    sim = Simulator(alg, model, nn.functional.cross_entropy, data, seed=5)
    sim.run(3)
    strategy = FedSpeedStrategy(len(data), alg, seed=5)
    app = algorithm_client_app(alg, model, nn.functional.cross_entropy, lambda i: data[i])
    contexts = _contexts(len(data))
    arrays = to_record({"model": flatten(list(model.parameters()))})
    for r in (1, 2, 3):  # the clients' corrections persist in their Context.state
        messages = strategy.configure_train(r, arrays, ConfigRecord(), Grid(contexts))
        replies = [app(m, contexts[m.metadata.dst_node_id]) for m in messages]
        arrays, metrics = strategy.aggregate_train(r, replies)
    assert torch.equal(from_record(arrays)["model"], sim.global_model())
    assert strategy.rounds[-1]["clients"] == [0, 1, 2, 3]
    assert strategy.rounds[-1]["bytes_up"] == sum(sim.history[-1].bytes_up.values())


def test_optimizer_client_app_runs_an_anyorder_optimizer_under_flowers_fedavg():
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    data, model = make_problem(num_clients=3)
    make = lambda params: ZOSGD(params, lr=0.05, mu=1e-3, seed=2)  # noqa: E731
    app = optimizer_client_app(model, nn.functional.cross_entropy, make, lambda i: data[i],
                               local_steps=3, batch_size=4, seed=9)  # fmt: skip
    contexts = _contexts(3)
    strategy = FlowerFedAvg(min_train_nodes=3, min_available_nodes=3)
    messages = strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(),
                                        Grid(contexts))  # fmt: skip
    replies = [app(m, contexts[m.metadata.dst_node_id]) for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    # reference: each client's three ZO-SGD steps on its own batches, averaged by size
    total = sum(len(d) for d in data)
    want = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for i, d in enumerate(data):
        local = copy.deepcopy(model)
        opt = make(local.parameters())
        ctx = ClientContext(i, d, local, nn.functional.cross_entropy, client_generator(9, 0, i))
        for xb, yb in ctx.batches(3, 4):
            opt.step(lambda backward=False, xb=xb, yb=yb, m=local: nn.functional.cross_entropy(m(xb), yb))
        for k, v in local.state_dict().items():
            want[k] += len(d) / total * v
    got = arrays.to_torch_state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-12)
        assert not torch.equal(v, model.state_dict()[k])  # the model moved


# -- Flower's deployment engine: a SuperLink, two SuperNodes and `flwr run`, started and stopped
# by this test (by PID, with every process they spawned).

APP = __import__("pathlib").Path(__file__).parent / "flower_app"


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(pid):
    import os

    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                kids.append(int(entry))
    return [k for kid in kids for k in (kid, *_descendants(kid))]


def _wait_for_port(port, process, timeout=120):
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the SuperLink exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def _stop(pids):
    import os
    import signal
    import time

    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    alive = list(pids)
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]  # fmt: skip
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_fedspeed_on_flowers_deployment_engine_equals_the_simulator(tmp_path):
    import importlib.util
    import os
    import shutil
    import subprocess
    import sys
    import time

    bin_dir = os.path.dirname(sys.executable)
    if not shutil.which("flower-superlink", path=bin_dir):
        pytest.skip("Flower's deployment binaries are not installed")
    home = tmp_path / "flwr-home"
    home.mkdir()
    link, node0, node1 = _free_ports(3)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    src = str(__import__("pathlib").Path(__file__).parents[2] / "src")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    out = tmp_path / "result.pt"
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1")]  # noqa: SIM115
    started = []
    try:
        started.append(subprocess.Popen(
            [f"{bin_dir}/flower-superlink", "--insecure", "--port", str(link)],
            env=env, stdout=logs[0], stderr=subprocess.STDOUT))  # fmt: skip
        _wait_for_port(link, started[0])
        for i, port in enumerate((node0, node1)):
            started.append(subprocess.Popen(
                [f"{bin_dir}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                 "--port", str(port), "--node-config", f"partition-id={i}"],
                env=env, stdout=logs[1 + i], stderr=subprocess.STDOUT))  # fmt: skip
        run = subprocess.run(
            [f"{bin_dir}/flwr", "run", str(app), "local", "--stream",
             "--run-config", f"out='{out}'"],
            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline:
            time.sleep(1)
    finally:
        everything = [pid for p in started for pid in (p.pid, *_descendants(p.pid))]
        _stop(everything)
        for p in started:
            p.wait(timeout=30)
        for fh in logs:
            fh.close()
    spec = importlib.util.spec_from_file_location("fedapp_reference", APP / "fedapp.py")
    fedapp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fedapp)
    sim = Simulator(fedapp.ALG, fedapp.MODEL, nn.functional.cross_entropy, fedapp.DATA,
                    seed=fedapp.SEED)  # fmt: skip
    sim.run(2)
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["model"], sim.global_model())
    assert [r["clients"] for r in got["rounds"]] == [[0, 1], [0, 1]]
