"""Baselines and timings for the ``text-finetune`` task (all-MiniLM-L6-v2 on fresh/rotten reviews).

Usage: python benchmarks/text_finetune_baselines.py [--threads 2] [--steps 200] [--lrs 2e-5,...]

Prints, on this machine with ``--threads`` torch threads:

* the median time of one AdamW training step at the task's batch size (16), with the task's own
  batches (padding trimmed to each batch's longest review), and of one no-grad forward (the
  runner's ``inference_figures``);
* (a) a frozen-encoder baseline: scikit-learn's ``LogisticRegression`` (default C=1) on the
  pretrained encoder's mean-pooled embeddings of the training reviews, scored on the held-out ones;
* (b) fine-tuning end to end with AdamW (weight decay 0.01, the registry's) for ``--steps`` steps
  at each learning rate, from the bench's seed-0 model and data order, as ``anyorder bench``
  would run it.

Accuracies are given on all 973 held-out reviews and on the 500 the task's metric scores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


@torch.no_grad()
def _embeddings(task, model, idx: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(idx), 64):
        part = torch.from_numpy(idx[i : i + 64])
        out.append(model.embed(*task._batch(part)[:2]))
    return torch.cat(out).numpy()


@torch.no_grad()
def _accuracy(task, model, idx: np.ndarray) -> float:
    _, _, labels = task._tokenized()
    was_training = model.training
    model.eval()
    try:
        predicted = task._logits(model, idx).argmax(-1)
    finally:
        model.train(was_training)
    return float((predicted == labels[idx]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lrs", default="2e-5,3e-5,5e-5,1e-4,1e-2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sklearn.linear_model import LogisticRegression

    from anyorder.bench.registry import get_task
    from anyorder.bench.runner import inference_figures
    from anyorder.bench.tasks import text_finetune as tf

    t0 = time.perf_counter()
    task = get_task("text-finetune")()
    model = task.init_model(args.seed)
    texts, labels_np, train, held_out = tf.load_reviews()
    _, subset = task.eval_indices()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; loading took "
        f"{time.perf_counter() - t0:.1f} s"
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"reviews: {len(texts)} ({int(labels_np.sum())} fresh), train {len(train)}, "
        f"held out {len(held_out)} (metric scores {len(subset)}); {n_params / 1e6:.2f}M params"
    )

    # Timings.
    peak, forward_s = inference_figures(task, args.seed, repeats=20)
    print(
        f"no-grad forward, batch {task.options['batch_size']}: {1e3 * forward_s:.1f} ms "
        f"(median of 20), peak {peak / 2**20:.1f} MiB"
    )
    step_model = task.init_model(args.seed)
    opt = torch.optim.AdamW(step_model.parameters(), lr=3e-5, weight_decay=0.01, foreach=True)
    batches = task.batches(torch.Generator().manual_seed(args.seed))
    times, widths = [], []
    for _ in range(12):
        batch = next(batches)
        widths.append(batch[0].shape[1])
        start = time.perf_counter()
        opt.zero_grad()
        task.loss(step_model, batch).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    print(
        f"AdamW step, batch {task.options['batch_size']}: {_median_ms(times[2:]):.0f} ms "
        f"(median of 10 after 2 warm-up; mean padded width {np.mean(widths):.1f} tokens)"
    )
    del step_model, opt

    # (a) Frozen encoder + logistic regression.
    start = time.perf_counter()
    model.eval()
    x_train, x_test = _embeddings(task, model, train), _embeddings(task, model, held_out)
    clf = LogisticRegression(max_iter=2000).fit(x_train, labels_np[train])
    on_subset = np.isin(held_out, subset)
    hits = clf.predict(x_test) == labels_np[held_out]
    print(
        f"(a) frozen encoder + LogisticRegression: held-out accuracy {hits.mean():.4f} "
        f"(all {len(held_out)}), {hits[on_subset].mean():.4f} (metric's {len(subset)}); "
        f"{time.perf_counter() - start:.0f} s"
    )

    # (b) Fine-tuning with AdamW.
    for lr in (float(v) for v in args.lrs.split(",")):
        start = time.perf_counter()
        model = task.init_model(args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, foreach=True)
        batches = task.batches(torch.Generator().manual_seed(args.seed))
        for _ in range(args.steps):
            batch = next(batches)
            opt.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
        train_time = time.perf_counter() - start
        objective, metric = task.evaluate(model)
        everything = _accuracy(task, model, held_out)
        print(
            f"(b) AdamW lr {lr:g}, {args.steps} steps: held-out accuracy {everything:.4f} "
            f"(all {len(held_out)}), {metric:.4f} (metric's {len(subset)}); training objective "
            f"{objective:.4f}; last batch loss {float(loss.detach()):.4f}; training {train_time:.0f} s"
        )


if __name__ == "__main__":
    main()
