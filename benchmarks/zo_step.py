"""Time and memory of one zeroth-order step against one forward pass, side by side in one run.

Usage: python benchmarks/zo_step.py [--models char-lm,gpt2-4x256,bert-4x256,text-finetune]
                                    [--rounds 15] [--threads 2] [--device cpu]

For each model and batch it measures, interleaved round-robin so that machine noise hits every
method alike, the median wall time of:
  forward        one loss evaluation under no_grad (the unit: ratios are to this)
  zosgd          anyorder.optim.ZOSGD step (default directions: Rademacher on the CPU, Gaussian on a
                 GPU; 3 passes over the weights; the default bit-exact "compact" restore)
  zosgd-arith    the same with restore="arithmetic" (MeZO's restore, no memory; the default
                 before the compact restore): zosgd / zosgd-arith is the compact restore's cost
  zosgd-gauss    the same with Gaussian directions
  mezo-ref       MeZO's zo_step algorithm written out plainly (perturb, forward, perturb, forward,
                 restore, then update: four passes, each redrawing z after torch.manual_seed, as
                 the MeZO reference does), in place
  adamw          torch.optim.AdamW(foreach=True) step by backprop
  mezo           (with --mezo-trainer PATH) MeZO's own code: the zo_step and zo_update methods of
                 OurTrainer in the MeZO repository's large_models/trainer.py, read from PATH and
                 run unmodified on a minimal host object (see load_mezo_methods); nothing of it
                 is copied here. Get the file with `git clone https://github.com/princeton-nlp/MeZO`.
and the peak tensor memory of each above what was held before (anyorder.bench.measure), as a
ratio to the inference peak. Models: the bench's char-lm GPT-2; GPT-2 and BERT classifiers of
4 layers, width 256, sequence 128, batch 16 (the sizes the issue's MeZO figures use); the bench's
text-finetune MiniLM when installed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from anyorder.bench.measure import peak_memory_bytes
from anyorder.optim import ZOSGD


def mezo_reference_step(params, loss_fn, lr: float, eps: float, seed: int) -> float:
    """MeZO's zo_step + zo_update as the paper's algorithm states them (four passes)."""

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale * eps)

    with torch.no_grad():
        perturb(1)
        l1 = float(loss_fn())
        perturb(-2)
        l2 = float(loss_fn())
        perturb(1)
        g = (l1 - l2) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=-lr * g)
    return (l1 + l2) / 2


def load_mezo_methods(path: str) -> type:
    """A host class whose zo_* methods are MeZO's, compiled from its trainer.py source.

    The module itself cannot be imported with current transformers (it imports long-removed
    names), so only the four methods of ``OurTrainer`` that make a MeZO step are compiled, as
    written, and bound to a class that supplies what they read from the Hugging Face Trainer:
    ``args`` (zo_eps, weight_decay, ...), ``_prepare_inputs``, ``compute_loss_context_manager``,
    ``compute_loss``, ``_get_learning_rate`` and ``lr_scheduler``. ``inputs`` is the loss
    function of the benchmark model.
    """
    import numpy as np

    source = Path(path).read_text()
    tree = ast.parse(source)
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OurTrainer")
    wanted = {"zo_perturb_parameters", "zo_forward", "zo_step", "zo_update"}
    methods = [n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    if {m.name for m in methods} != wanted:
        raise ValueError(f"{path} does not define {sorted(wanted)} in OurTrainer")
    namespace: dict = {"torch": torch, "np": np}
    exec(compile(ast.Module(body=methods, type_ignores=[]), path, "exec"), namespace)

    class MeZOHost:
        def __init__(self, lr: float, eps: float) -> None:
            self.args = SimpleNamespace(
                zo_eps=eps, weight_decay=0.0, gradient_accumulation_steps=1, non_diff=False, n_gpu=1
            )
            self.lr = lr
            self.lr_scheduler = SimpleNamespace(step=lambda: None)

        def _prepare_inputs(self, inputs):
            return inputs

        def compute_loss_context_manager(self):
            return contextlib.nullcontext()

        def compute_loss(self, model, inputs):
            return inputs()

        def _get_learning_rate(self):
            return self.lr

    for name in wanted:
        setattr(MeZOHost, name, namespace[name])
    return MeZOHost


def build(name: str, device: str):
    """(model, loss_fn) for a named benchmark model."""
    g = torch.Generator().manual_seed(0)
    if name in ("char-lm", "text-finetune", "digits-mlp"):
        from anyorder.bench.registry import get_task

        task = get_task(name)(device=device)
        model = task.init_model(0)
        batch = next(task.batches(g))
        return model, lambda: task.loss(model, batch)
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (16, 128), generator=g).to(device)
    if name == "gpt2-4x256":
        cfg = GPT2Config(
            vocab_size=1000,
            n_positions=128,
            n_embd=256,
            n_layer=4,
            n_head=4,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            bos_token_id=None,
            eos_token_id=None,
        )
        model = GPT2LMHeadModel(cfg).to(device)

        def loss():
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, 1000), ids[:, 1:].reshape(-1))

        return model, loss
    if name == "bert-4x256":
        cfg = BertConfig(
            vocab_size=1000,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=128,
            hidden_dropout_prob=0,
            attention_probs_dropout_prob=0,
            num_labels=2,
        )
        model = BertForSequenceClassification(cfg).to(device)
        labels = torch.randint(0, 2, (16,), generator=g).to(device)
        return model, lambda: F.cross_entropy(model(input_ids=ids).logits, labels)
    raise ValueError(f"unknown model {name!r}")


def measure(name: str, rounds: int, device: str, mezo_host: type | None = None) -> dict[str, float]:
    model, loss_fn = build(name, device)
    model.eval()  # MeZO's zo_forward sets eval mode; every method runs in it
    params = [p for p in model.parameters() if p.requires_grad]

    def forward():
        with torch.no_grad():
            loss_fn()

    zo = ZOSGD(params, lr=1e-7, mu=1e-3, seed=0)
    zo_arith = ZOSGD(params, lr=1e-7, mu=1e-3, seed=0, restore="arithmetic")
    zo_gauss = ZOSGD(params, lr=1e-7, mu=1e-3, seed=0, distribution="gaussian")
    adamw = torch.optim.AdamW(params, lr=1e-7, foreach=True)
    step = {"n": 0}

    def adamw_step():
        adamw.zero_grad(set_to_none=True)
        loss_fn().backward()
        adamw.step()

    def mezo():
        step["n"] += 1
        mezo_reference_step(params, loss_fn, lr=1e-7, eps=1e-3, seed=step["n"])

    methods = {
        "forward": forward,
        "zosgd": lambda: zo.step(lambda backward=False: loss_fn()),
        "zosgd-arith": lambda: zo_arith.step(lambda backward=False: loss_fn()),
        "zosgd-gauss": lambda: zo_gauss.step(lambda backward=False: loss_fn()),
        "mezo-ref": mezo,
        "adamw": adamw_step,
    }
    if mezo_host is not None:
        host = mezo_host(lr=1e-7, eps=1e-3)

        def mezo_own() -> None:
            host.zo_step(model, loss_fn)
            host.zo_update(model)

        methods["mezo"] = mezo_own
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():  # warm-up (allocates AdamW's state)
        fn()
    for _ in range(rounds):
        for key, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    adamw.zero_grad(set_to_none=True)
    mem = {k: peak_memory_bytes(fn, device) for k, fn in methods.items()}
    out.update({f"{k}_peak_bytes": v for k, v in mem.items()})
    out["params"] = sum(p.numel() for p in params)
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="char-lm,gpt2-4x256,bert-4x256,text-finetune")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--mezo-trainer",
        help="path to MeZO's large_models/trainer.py: also time MeZO's own zo_step + zo_update",
    )
    args = parser.parse_args()
    mezo_host = load_mezo_methods(args.mezo_trainer) if args.mezo_trainer else None
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"rounds {args.rounds}, load {os.getloadavg()[0]:.1f}\n"
    )
    mezo_cols = " mezo / fwd | zosgd / mezo | mezo mem / infer |" if mezo_host else ""
    print(
        "| model | params | forward ms | zosgd / fwd | zosgd-arith / fwd | zosgd / zosgd-arith | "
        "zosgd-gauss / fwd | mezo-ref / fwd | adamw / fwd | zosgd mem / infer | "
        "zosgd-arith mem / infer | mezo-ref mem / infer | adamw mem / infer | params MB | "
        "infer MB | zosgd - zosgd-arith MB |" + mezo_cols
    )
    print(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        + "---|" * (3 if mezo_host else 0)
    )
    for name in args.models.split(","):
        try:
            r = measure(name, args.rounds, args.device, mezo_host)
        except Exception as err:  # e.g. text-finetune's data package missing
            print(f"| {name} | skipped: {err} |")
            continue
        f, inf = r["forward_s"], max(r["forward_peak_bytes"], 1)
        print(
            f"| {name} | {r['params'] / 1e6:.2f}M | {f * 1e3:.1f} | {r['zosgd_s'] / f:.2f} | "
            f"{r['zosgd-arith_s'] / f:.2f} | {r['zosgd_s'] / r['zosgd-arith_s']:.3f} | "
            f"{r['zosgd-gauss_s'] / f:.2f} | {r['mezo-ref_s'] / f:.2f} | {r['adamw_s'] / f:.2f} | "
            f"{r['zosgd_peak_bytes'] / inf:.2f} | {r['zosgd-arith_peak_bytes'] / inf:.2f} | "
            f"{r['mezo-ref_peak_bytes'] / inf:.2f} | "
            f"{r['adamw_peak_bytes'] / inf:.2f} | {r['param_bytes'] / 2**20:.1f} | {inf / 2**20:.1f} | "
            f"{(r['zosgd_peak_bytes'] - r['zosgd-arith_peak_bytes']) / 2**20:.2f} |"
            + (
                f" {r['mezo_s'] / f:.2f} | {r['zosgd_s'] / r['mezo_s']:.2f} | "
                f"{r['mezo_peak_bytes'] / inf:.2f} |"
                if mezo_host
                else ""
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
