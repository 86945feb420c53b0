"""Measurement sees what it claims to see."""

import torch

from anyorder.bench.measure import EvalCounter, median_step_time, peak_memory_bytes


def test_peak_memory_sees_a_known_allocation():
    def work():
        x = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB
        x.fill_(1.0)

    peak = peak_memory_bytes(work)
    assert 4_000_000 <= peak < 4_100_000


def test_peak_memory_follows_frees_in_time_order():
    def work():
        a = torch.empty(1_000_000)  # +4 MB
        b = torch.empty(500_000)  # +2 MB  -> 6 MB
        del a  # -4 MB      -> 2 MB
        c = torch.empty(2_000_000)  # +8 MB  -> 10 MB
        return b, c

    assert peak_memory_bytes(work) == 10_000_000


def test_memory_held_before_the_work_is_not_counted():
    held = torch.empty(5_000_000)  # 20 MB held before

    def work():
        held.add_(1.0)  # in place: no new memory

    assert peak_memory_bytes(work) < 100_000


def test_eval_counter_counts_forwards_and_every_kind_of_backward():
    x = torch.ones(3, requires_grad=True)
    counter = EvalCounter()
    loss_fn = counter.wrap(lambda: (x**2).sum())
    loss_fn().backward()
    torch.autograd.grad(loss_fn(), [x])
    with torch.no_grad():
        loss_fn()
    assert (counter.forward, counter.backward) == (3, 2)


def test_median_step_time_skips_warmup():
    assert median_step_time([100.0, 50.0, 1.0, 2.0, 3.0], warmup=2) == 2.0
    assert median_step_time([5.0], warmup=2) == 5.0
