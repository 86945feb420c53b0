"""A two-client FedSpeed federation on Flower (anyorder's adapter)."""
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from anyorder.federated import ClientData, flatten
from anyorder.federated.fedspeed import FedSpeed
from anyorder.federated.flower import FedSpeedStrategy, algorithm_client_app, to_record

ALG = FedSpeed(local_steps=2, batch_size=4, lr=0.1)
SEED = 5


def problem():
    gen = torch.Generator().manual_seed(0)
    data = [ClientData(torch.randn(n, 5, generator=gen, dtype=torch.float64),
                       torch.randint(0, 3, (n,), generator=gen)) for n in (7, 12)]
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return data, model


DATA, MODEL = problem()
client_app = algorithm_client_app(ALG, MODEL, nn.functional.cross_entropy, lambda i: DATA[i])
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedSpeedStrategy(len(DATA), ALG, seed=SEED)
    result = strategy.start(grid, to_record({"model": flatten(list(MODEL.parameters()))}),
                            num_rounds=int(context.run_config["num-server-rounds"]))
    torch.save({"model": result.arrays.to_torch_state_dict()["model"], "rounds": strategy.rounds},
               context.run_config["out"])
