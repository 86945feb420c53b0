"""ClosureTrainer: every closure optimizer trains through the Hugging Face Trainer on the same
trajectory as a plain loop; zeroth-order steps run no backward pass; accumulation means what the
module docstring says (against hand-written references); a checkpoint resumes bit-identically;
settings that cannot carry over are refused naming the setting."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from anyorder.core import make_closure  # noqa: E402
from anyorder.integrations import ClosureTrainer  # noqa: E402
from anyorder.optim import CBO, SAM, ZOSGD, AdaHessian, Sophia, ZOAdam  # noqa: E402

VOCAB, LENGTH, N = 30, 8, 32


def tiny_classifier(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        classifier_dropout=dropout, attn_implementation="eager",
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(cfg)


class ToyData(torch.utils.data.Dataset):
    """N token sequences with binary labels, drawn from a seeded generator."""

    def __init__(self, n: int = N, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (n, LENGTH), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
        }


def batch_of(data: ToyData, start: int, size: int) -> dict[str, torch.Tensor]:
    rows = [data[i] for i in range(start, start + size)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
        learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
        train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        max_grad_norm=0.0,
    )  # fmt: skip
    kw.update(overrides)
    return TrainingArguments(**kw)


def hf_closure(model, batch):
    """The plain loop's contract closure: the model's own loss on one batch."""
    return make_closure(model, lambda out, _b: out, batch, forward=lambda m, b: m(**b).loss)


OPTIMIZERS = {
    "ZOSGD": lambda ps: ZOSGD(ps, lr=1e-2, mu=1e-3, seed=3),
    "ZOAdam": lambda ps: ZOAdam(ps, lr=1e-2, mu=1e-3, seed=3),
    "SAM": lambda ps: SAM(ps, "SGD", rho=0.05, lr=0.1),
    "Sophia": lambda ps: Sophia(ps, lr=1e-2, update_every=1, seed=1),
    "AdaHessian": lambda ps: AdaHessian(ps, lr=1e-2, seed=1),
    "CBO": lambda ps: CBO(ps, lr=0.1, n_particles=4, seed=2),
}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.fixture
def count_backward(monkeypatch):
    """Counts every autograd backward pass (``loss.backward()`` and ``torch.autograd.grad``)."""
    calls = {"backward": 0, "grad": 0}
    real_backward, real_grad = torch.autograd.backward, torch.autograd.grad

    def backward(*a, **k):
        calls["backward"] += 1
        return real_backward(*a, **k)

    def grad(*a, **k):
        calls["grad"] += 1
        return real_grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "backward", backward)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    return calls


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_closure_optimizer_follows_the_plain_loop(tmp_path, name):
    """Two Trainer steps == two steps of a plain loop over the same batches, bit for bit."""
    data, steps = ToyData(), 2
    model = tiny_classifier()
    opt = OPTIMIZERS[name](model.parameters())
    trainer = ClosureTrainer(
        model=model, args=training_args(tmp_path, max_steps=steps), train_dataset=data,
        optimizers=(opt, None),
    )  # fmt: skip
    trainer.train()
    assert trainer.closure_optimizer is opt

    ref = tiny_classifier().train()
    ref_opt = OPTIMIZERS[name](ref.parameters())
    for k in range(steps):
        ref_opt.step(hf_closure(ref, batch_of(data, 4 * k, 4)))
    assert_same_weights(model, ref)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_classifier().parameters()))


def test_zo_runs_no_backward_pass_and_the_plain_trainer_cannot_drive_it(tmp_path, count_backward):
    data = ToyData()
    model = tiny_classifier(dropout=0.1)
    grad_modes = []

    class Recording(ClosureTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            grad_modes.append(torch.is_grad_enabled())
            return super().compute_loss(model, inputs, **kwargs)

    trainer = Recording(
        model=model, args=training_args(tmp_path, max_steps=3, max_grad_norm=1.0),
        train_dataset=data, optimizers=(ZOSGD(model.parameters(), lr=1e-2), None),
    )  # fmt: skip
    trainer.train()
    assert count_backward == {"backward": 0, "grad": 0}
    assert grad_modes == [False] * 6  # every evaluation under no_grad: inference memory
    assert all(p.grad is None for p in model.parameters())
    assert trainer.closure_optimizer.global_state["step"] == 3
    assert trainer.closure_optimizer.global_state["evaluations"] == 6  # 2 per step, no more

    # Today's Trainer: a forward and a backward pass, then ZOSGD.step() raises for want of a
    # closure (the counter works: it sees that backward pass).
    model = tiny_classifier()
    plain = Trainer(
        model=model, args=training_args(tmp_path, max_steps=1), train_dataset=data,
        optimizers=(ZOSGD(model.parameters(), lr=1e-2), None),
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs a closure"):
        plain.train()
    assert count_backward["backward"] == 1


class SumOfSquares(nn.Module):
    """A model whose loss takes no ``num_items_in_batch``: the Trainer divides by the window."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.linear = nn.Linear(LENGTH, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.linear(input_ids.float() / VOCAB)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("kind", ["zo", "first_order"])
def test_accumulation_is_the_window_mean_under_one_direction(tmp_path, kind):
    """gradient_accumulation_steps=2, micro-batches of 2: ZO's closure loss is the mean of the two
    micro-batch losses under one perturbation (one direction per step); a first-order closure's
    gradient is the sum of the halved micro-batch gradients (the Trainer's own accumulation)."""
    data, steps = ToyData(), 3

    def make(ps):
        if kind == "zo":
            return ZOSGD(ps, lr=0.05, mu=1e-3, seed=5)
        return SAM(ps, "SGD", rho=0.05, lr=0.5)

    model = SumOfSquares()
    trainer = ClosureTrainer(
        model=model,
        args=training_args(
            tmp_path, max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2
        ),
        train_dataset=data, optimizers=(make(model.parameters()), None),
    )  # fmt: skip
    trainer.train()

    ref = SumOfSquares()
    ref_opt = make(ref.parameters())
    for k in range(steps):
        micro = [batch_of(data, 4 * k, 2), batch_of(data, 4 * k + 2, 2)]

        def closure(backward: bool = True, micro=micro):
            if not backward:  # the window's loss: mean of the micro-batch losses
                return ref(**micro[0])["loss"] / 2 + ref(**micro[1])["loss"] / 2
            ref.zero_grad()
            total = 0.0
            for b in micro:  # one micro-batch graph at a time, gradients added
                loss = ref(**b)["loss"] / 2
                loss.backward()
                total = total + loss.detach()
            return total

        ref_opt.step(closure)
    assert_same_weights(model, ref)
    if kind == "zo":
        assert trainer.closure_optimizer.global_state["step"] == steps  # one direction per step


def test_first_order_accumulation_equals_the_plain_trainer(tmp_path):
    """AdamW through ClosureTrainer's closure == the plain Trainer's backward + step, with
    gradient accumulation and clipping, on a model that normalises by num_items_in_batch."""
    data = ToyData()
    args = dict(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_grad_norm=0.05)  # fmt: skip
    models = [tiny_classifier(), tiny_classifier()]
    for cls, model in zip((Trainer, ClosureTrainer), models):
        cls(model=model, args=training_args(tmp_path, **args), train_dataset=data).train()
    assert_same_weights(*models)


def test_resume_from_a_trainer_checkpoint_is_bit_identical(tmp_path):
    """4 steps straight == 2 steps, a checkpoint, a fresh trainer resumed from it, 2 more steps:
    ZOAdam (moments, step counter, direction seed), a linear LR schedule and dropout masks."""
    data = ToyData()

    def run(out, max_steps, resume=None):
        model = tiny_classifier(dropout=0.1)
        opt = ZOAdam(model.parameters(), lr=1e-2, mu=1e-3, seed=7)
        args = training_args(
            out, max_steps=4, lr_scheduler_type="linear", save_strategy="steps", save_steps=2,
            train_sampling_strategy="random",
        )  # fmt: skip
        trainer = ClosureTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
        if max_steps < 4:
            trainer.add_callback(_StopAt(max_steps))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    straight, opt_a = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, opt_b = run(tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert_same_weights(straight, resumed)
    assert opt_a.global_state == opt_b.global_state
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == 0.0  # linear decay reached 0
    for p, q in zip(straight.parameters(), resumed.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])


from transformers import TrainerCallback  # noqa: E402


class _StopAt(TrainerCallback):
    """Stops training after ``n`` optimizer steps (an interrupted run, its checkpoint written)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.n:
            control.should_training_stop = True
        return control


def test_logged_loss_is_the_steps_loss_and_evaluation_runs(tmp_path):
    data = ToyData()
    model = tiny_classifier()
    opt = ZOSGD(model.parameters(), lr=1e-2)
    losses = []
    real_step = opt.step

    def recording_step(closure):
        losses.append(real_step(closure))
        return losses[-1]

    opt.step = recording_step
    trainer = ClosureTrainer(
        model=model, args=training_args(tmp_path, max_steps=2, logging_steps=1,
                                        logging_strategy="steps"),
        train_dataset=data, eval_dataset=ToyData(8, seed=1), optimizers=(opt, None),
    )  # fmt: skip
    trainer.train()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx(losses, rel=1e-6)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_settings_that_cannot_carry_over_are_refused(tmp_path):
    data = ToyData()
    model = tiny_classifier()
    for opt in (ZOSGD(model.parameters(), lr=1e-2), Sophia(model.parameters())):
        with pytest.raises(ValueError, match="max_grad_norm=0.5"):
            ClosureTrainer(model=model, args=training_args(tmp_path, max_grad_norm=0.5),
                           train_dataset=data, optimizers=(opt, None))  # fmt: skip
    # the default is ignored, documented; SAM clips inside its closure
    ClosureTrainer(model=model, args=training_args(tmp_path, max_grad_norm=1.0),
                   train_dataset=data, optimizers=(ZOSGD(model.parameters(), lr=1e-2), None))  # fmt: skip
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        ClosureTrainer(
            model=model, args=training_args(tmp_path, gradient_accumulation_steps=2),
            train_dataset=data, optimizers=(Sophia(model.parameters(), estimator="gnb"), None),
        )  # fmt: skip
    # optimizer built by the Trainer from optimizer_cls_and_kwargs: checked when created
    trainer = ClosureTrainer(
        model=model, args=training_args(tmp_path, max_grad_norm=2.0), train_dataset=data,
        optimizer_cls_and_kwargs=(ZOSGD, {"lr": 1e-2}),
    )  # fmt: skip
    with pytest.raises(ValueError, match="max_grad_norm=2"):
        trainer.train()
    assert all(p.grad is None for p in model.parameters())


def test_fp16_is_refused_naming_the_setting(tmp_path):
    args = training_args(tmp_path)
    args.fp16 = True  # on a CPU machine TrainingArguments itself may refuse fp16=True
    model = tiny_classifier()
    with pytest.raises(ValueError, match="fp16=True"):
        ClosureTrainer(model=model, args=args, train_dataset=ToyData(),
                       optimizers=(ZOSGD(model.parameters(), lr=1e-2), None))  # fmt: skip


def test_bf16_runs_the_closure_under_autocast(tmp_path):
    """bf16=True: the ZO step equals a plain loop whose forward runs under CPU bf16 autocast."""
    data = ToyData()
    model = tiny_classifier()
    args = training_args(tmp_path, max_steps=2, bf16=True)
    ClosureTrainer(model=model, args=args, train_dataset=data,
                   optimizers=(ZOSGD(model.parameters(), lr=1e-2, seed=3), None)).train()  # fmt: skip

    def forward(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(**b).loss.float()

    ref = tiny_classifier().train()
    ref_opt = ZOSGD(ref.parameters(), lr=1e-2, seed=3)
    for k in range(2):
        b = batch_of(data, 4 * k, 4)
        ref_opt.step(make_closure(ref, lambda out, _b: out, b, forward=forward))
    assert_same_weights(model, ref)


def test_minilm_zo_through_the_trainer_equals_the_plain_loop(tmp_path, count_backward):
    """The bench's offline MiniLM (22.7M parameters) with a classification head: two ZOSGD steps
    through ClosureTrainer, no backward pass, the same weights as the plain loop."""
    text = pytest.importorskip("anyorder.bench.tasks.text_finetune")
    try:
        path = text.model_dir()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"MiniLM is not installed: {err}")
    from transformers import AutoModelForSequenceClassification

    ids, mask, labels = (t[:8] for t in text.load_tokenized(64))
    ids, mask = ids[:, :32], mask[:, :32]
    rows = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=2, local_files_only=True,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            )  # fmt: skip

    model = build()
    ref = copy.deepcopy(model).train()
    ClosureTrainer(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=rows,
        optimizers=(ZOSGD(model.parameters(), lr=1e-5, mu=1e-3), None),
    ).train()  # fmt: skip
    assert count_backward == {"backward": 0, "grad": 0}
    ref_opt = ZOSGD(ref.parameters(), lr=1e-5, mu=1e-3)
    for k in range(2):
        batch = {"input_ids": ids[4 * k : 4 * k + 4], "attention_mask": mask[4 * k : 4 * k + 4],
                 "labels": labels[4 * k : 4 * k + 4]}  # fmt: skip
        ref_opt.step(hf_closure(ref, batch))
    assert_same_weights(model, ref)


def test_sophia_gnb_gets_the_logits_from_the_trainer_closure(tmp_path):
    """Sophia-G (Gauss-Newton-Bartlett) through ClosureTrainer: the closure returns
    (loss, logits); refresh on step 0 and 2, backward steps 1 and 3; same weights as a plain
    loop with a hand-written (loss, logits) closure."""
    data, steps = ToyData(), 4
    make = lambda ps: Sophia(ps, lr=1e-2, update_every=2, estimator="gnb", seed=1)  # noqa: E731
    model = tiny_classifier()
    ClosureTrainer(model=model, args=training_args(tmp_path, max_steps=steps), train_dataset=data,
                   optimizers=(make(model.parameters()), None)).train()  # fmt: skip
    ref = tiny_classifier().train()
    opt = make(ref.parameters())
    for k in range(steps):
        b = batch_of(data, 4 * k, 4)

        def closure(backward: bool = True, b=b):
            if backward:
                ref.zero_grad()
                with torch.enable_grad():
                    out = ref(**b)
                out.loss.backward()
            else:
                out = ref(**b)
            return out.loss, out.logits

        opt.step(closure)
    assert_same_weights(model, ref)
    assert opt.global_state["hessian_refreshes"] == 2


def test_an_interrupt_inside_the_closure_leaves_weights_and_state_as_they_were(tmp_path):
    """KeyboardInterrupt in the second evaluation of the second step: the weights are those after
    the first step, bit for bit (exact_restore), and the optimizer's counters say one step."""
    data = ToyData()

    class Interrupted(ClosureTrainer):
        calls = 0

        def compute_loss(self, model, inputs, **kwargs):
            type(self).calls += 1
            if type(self).calls == 4:
                raise KeyboardInterrupt
            return super().compute_loss(model, inputs, **kwargs)

    model = tiny_classifier()
    opt = ZOSGD(model.parameters(), lr=1e-2, seed=3, exact_restore=True)
    trainer = Interrupted(model=model, args=training_args(tmp_path, max_steps=3),
                          train_dataset=data, optimizers=(opt, None))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    ref = tiny_classifier().train()
    ref_opt = ZOSGD(ref.parameters(), lr=1e-2, seed=3)
    ref_opt.step(hf_closure(ref, batch_of(data, 0, 4)))
    assert_same_weights(model, ref)
    assert opt.global_state["step"] == 1 and opt.global_state["evaluations"] == 2
