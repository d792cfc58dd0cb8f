"""Results in the evidence format: ``runs.csv`` (one row per run, every tuning run included)
and ``table.md`` regenerated from it alone (plus ``meta.json``).

Used for grids whose every cell holds out a validation split (``data.validation_fraction`` >
0). Per row: the method and axis values, the seed, the selection split (``validation``) and
metric, the selected hyperparameters, the validation-selected round with its test accuracy,
balanced accuracy, macro-F1 and AUC (binary tasks), the same at the last round, the git commit
and the exact command. ``table.md`` reports, per group of reported cells, the mean and 95% t
interval over seeds, and per claim of the grid the paired difference over seeds with its
interval, win counts and a verdict (:mod:`ffa_jax.experiments.stats`).

``ffa-jax experiment NAME --table`` rewrites ``table.md`` from the committed ``runs.csv`` and
``meta.json`` without running anything (a test checks the committed tables this way).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ffa_jax.experiments import grid as grid_lib
from ffa_jax.experiments import plots, stats
from ffa_jax.experiments import results as results_lib
from ffa_jax.fileio import atomic_write_text

METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "auc")
ROW_FIELDS = (
    "status",
    "select_on",
    "select_metric",
    "val_score",
    "selected_round",
    *(f"selected_test_{m}" for m in METRICS),
    "selected_test_recall_per_class",
    "last_round",
    *(f"last_test_{m}" for m in METRICS),
    "majority_accuracy",
    "epsilon_spent",
    "uplink_bytes_per_client_per_round",
    "wall_seconds",
    "commit",
    "command",
)
CURVES_PNG = "validation_curves.png"
REPORTED = results_lib.REPORTED
# How runs.csv marks the evidence format (older results have no such column).
FORMAT_COLUMN = "select_on"


def fieldnames(grid) -> list[str]:
    tuned = list(grid.tune.fields) if grid.tune is not None else []
    return ["stage", "cell_id", "seed", *grid.axes, *tuned, *ROW_FIELDS]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def csv_row(grid, c: dict[str, Any]) -> dict[str, str]:
    """One ``runs.csv`` row of a cell record."""
    row: dict[str, Any] = {
        "stage": c["stage"],
        "cell_id": c["cell_id"],
        "seed": c["seed"],
        "status": c.get("status"),
        "select_on": grid.select_on,
        "select_metric": next(
            (k.removeprefix("selected_val_") for k in c if k.startswith("selected_val_")), ""
        ),
        "val_score": next((v for k, v in c.items() if k.startswith("selected_val_")), None),
        "selected_round": c.get("selected_round"),
        "last_round": c.get("rounds") if c.get("status") == "ok" else None,
        "majority_accuracy": c.get("majority_accuracy"),
        "epsilon_spent": c.get("epsilon"),
        "uplink_bytes_per_client_per_round": c.get("uplink_bytes_per_client_per_round"),
        "wall_seconds": c.get("wall_seconds"),
        "commit": c.get("commit"),
        "command": c.get("command"),
    }
    recall = c.get("selected_test_recall_per_class")
    # Per-class recall of the selected round's model, class by class (balanced accuracy is
    # their mean): "0.91;0.85".
    row["selected_test_recall_per_class"] = (
        ";".join(f"{r:.4g}" for r in recall) if isinstance(recall, list) else None
    )
    for m in METRICS:
        row[f"selected_test_{m}"] = c.get(f"selected_test_{m}")
        row[f"last_test_{m}"] = c.get(f"test_{m}")
    for a in grid.axes:
        row[a] = c["axes"].get(a)
    for f, v in grid_lib.tuned_values(c).items():
        row[f] = grid_lib.fmt_value(v)
    return {k: _fmt(row.get(k)) for k in fieldnames(grid)}


def write_runs_csv(grid, path: Path, cells: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames(grid), lineterminator="\n")
    w.writeheader()
    for c in cells:
        w.writerow(csv_row(grid, c))
    atomic_write_text(path, buf.getvalue())


def read_runs_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(s: str | None) -> float | None:
    if s is None or s == "":
        return None
    return float(s)


def _ci(values: list[float]) -> str:
    if not values:
        return "-"
    mean, half = stats.mean_ci(values)
    return f"{mean:.3f}" if half is None else f"{mean:.3f} ± {half:.3f}"


def _groups(grid, rows: list[dict[str, str]]) -> dict[tuple, list[dict[str, str]]]:
    out: dict[tuple, list[dict[str, str]]] = {}
    for r in rows:
        out.setdefault(tuple(r[a] for a in grid.axes), []).append(r)
    order = {a: [grid_lib.fmt_value(v) for v in vs] for a, vs in grid.axes.items()}

    def key(g):
        return tuple(
            order[a].index(v) if v in order[a] else len(order[a])
            for a, v in zip(grid.axes, g, strict=True)
        )

    return dict(sorted(out.items(), key=lambda kv: key(kv[0])))


def results_table(grid, main: list[dict[str, str]]) -> str:
    tuned = list(grid.tune.fields) if grid.tune is not None else []
    header = [grid_lib.short(a) for a in grid.axes] + [
        *(f"{grid_lib.short(f)} (selected)" for f in tuned),
        "seeds",
        "balanced accuracy",
        "macro-F1",
        "AUC",
        "accuracy",
        "per-class recall (mean)",
        "selected round (min-max)",
        "last-round balanced accuracy",
        "majority-class accuracy (balanced: 1 / classes)",
        "diverged/failed",
    ]
    out = []
    for g, members in _groups(grid, main).items():
        ok = [r for r in members if r["status"] == "ok"]
        # A diverged run counts by its early-stopped model (the validation-selected round
        # before the divergence) where it has one: no survivorship bias in the means.
        reported = [r for r in members if r["status"] in REPORTED]

        def col(name, rows=reported):
            return [v for v in (_num(r[name]) for r in rows) if v is not None]

        rounds = col("selected_round")
        out.append(
            [grid_lib.axis_label(a, v) for a, v in zip(grid.axes, g, strict=True)]
            + [", ".join(sorted({r[f] for r in members})) for f in tuned]
            + [
                str(len(members)),
                _ci(col("selected_test_balanced_accuracy")),
                _ci(col("selected_test_macro_f1")),
                _ci(col("selected_test_auc")),
                _ci(col("selected_test_accuracy")),
                _recalls(reported),
                f"{min(rounds):.0f}-{max(rounds):.0f}" if rounds else "-",
                _ci(col("last_test_balanced_accuracy")),
                f"{sum(col('majority_accuracy', ok)) / max(len(ok), 1):.3f}" if ok else "-",
                str(len(members) - len(ok)),
            ]
        )
    return results_lib.md_table(header, out)


ARROW = " → "  # how a gap_grows claim shows its [from, to] pair of conditions


def _recalls(rows: list[dict[str, str]]) -> str:
    """Each class's test recall at the selected round, mean over ``rows`` ("0.912 / 0.850");
    "-" where runs.csv predates the column."""
    per = [
        [float(x) for x in r["selected_test_recall_per_class"].split(";")]
        for r in rows
        if r.get("selected_test_recall_per_class")
    ]
    if not per or len({len(p) for p in per}) != 1:
        return "-"
    return " / ".join(f"{sum(c) / len(c):.3f}" for c in zip(*per, strict=True))


def claim_rows(grid, claim: dict[str, Any], main: list[dict[str, str]]):
    """``[(where, Paired, verdict, why)]``: one per value combination of the axes other than
    the claim's ``axis`` (restricted to its ``at``). ``where`` is ``((axis, value), ...)``; for
    a ``gap_grows`` claim its ``along`` axis shows ``"from → to"`` and the pairs are the
    per-seed gaps ``better - worse`` at ``to`` (side A) and at ``from`` (side B)."""
    axis, metric = claim["axis"], "selected_test_" + claim["metric"]
    others = [a for a in grid.axes if a != axis]
    by_where: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in main:
        if any(r[a] not in vs for a, vs in claim["at"].items()):
            continue
        v = _num(r[metric]) if r["status"] in REPORTED else None
        if v is None:
            continue
        where = tuple((a, r[a]) for a in others)
        by_where.setdefault(where, {}).setdefault(r[axis], {})[int(r["seed"])] = v

    def sides(where):
        got = by_where.get(where, {})
        return got.get(claim["better"], {}), got.get(claim["worse"], {})

    pairs: dict[tuple, tuple[dict[int, float], dict[int, float]]] = {}
    if claim["along"] is None:
        pairs = {where: sides(where) for where in by_where}
    else:
        along, frm, to = claim["along"]

        def gap(where):
            b, w = sides(where)
            return {s: b[s] - w[s] for s in set(b) & set(w)}

        for where in by_where:
            if dict(where)[along] != frm:
                continue
            there = tuple((a, to if a == along else v) for a, v in where)
            shown = tuple((a, f"{frm}{ARROW}{to}" if a == along else v) for a, v in where)
            pairs[shown] = (gap(there), gap(where))
    order = {a: [grid_lib.fmt_value(v) for v in vs] for a, vs in grid.axes.items()}

    def position(where):
        return tuple(order[a].index(v) if v in order[a] else len(order[a]) for a, v in where)

    out = []
    for where, (a_side, b_side) in sorted(pairs.items(), key=lambda kv: position(kv[0])):
        p = stats.paired(a_side, b_side)
        v, why = stats.verdict(p, margin=claim["margin"], kind=claim["kind"])
        out.append((where, p, v, why))
    return out


def claim_sides(claim: dict[str, Any]) -> tuple[str, str]:
    """How tables name a claim's two sides A and B (the paired difference is A - B)."""
    axis = claim["axis"]
    better = grid_lib.axis_label(axis, claim["better"])
    worse = grid_lib.axis_label(axis, claim["worse"])
    if claim["along"] is not None:
        along, frm, to = claim["along"]
        gap = f"{better} - {worse}"
        return f"{gap} at {grid_lib.short(along)} {to}", f"{gap} at {grid_lib.short(along)} {frm}"
    if claim["kind"] in stats.EQUIVALENCE_KINDS:
        return f"{grid_lib.short(axis)} {better}", f"{grid_lib.short(axis)} {worse}"
    return better, worse


def claim_rule(claim: dict[str, Any]) -> str:
    """The claim's verdict rule in words, its margin filled in."""
    return stats.CLAIM_RULES[claim["kind"]].replace("+-margin", f"±{claim['margin']:g}")


def claims_section(grid, main: list[dict[str, str]]) -> list[str]:
    parts = []
    for claim in grid.claims:
        rows = claim_rows(grid, claim, main)
        a_name, b_name = claim_sides(claim)
        header = [grid_lib.short(a) for a in grid.axes if a != claim["axis"]] + [
            "pairs",
            a_name,
            b_name,
            "paired difference A - B (95% CI)",
            "seeds A > B / A < B / ties",
            "verdict",
        ]
        body = []
        for where, p, v, _ in rows:
            ci = "-" if p.half is None else f"{p.diff:+.3f} ± {p.half:.3f}"
            body.append(
                [grid_lib.axis_label(a, x) for a, x in where]
                + [
                    str(p.n),
                    "-" if p.n == 0 else f"{p.mean_better:.3f}",
                    "-" if p.n == 0 else f"{p.mean_worse:.3f}",
                    ci,
                    f"{p.wins} / {p.losses} / {p.ties}",
                    f"**{v}**",
                ]
            )
        parts += [
            f"### Claim: {claim['name']}",
            "",
            f"Test {claim['metric'].replace('_', ' ')} at each run's validation-selected round, "
            f"paired by seed; A = {a_name}, B = {b_name}. With at least 10 pairs, "
            f"{claim_rule(claim)}.",
            "",
            results_lib.md_table(header, body) if body else "(no finished pairs yet)",
            "",
        ]
    return parts


def tuning_table(grid, tune: list[dict[str, str]], main: list[dict[str, str]]) -> str:
    fields = list(grid.tune.fields)
    # (tuning group, combination) pairs the reported cells use (a tuning group may stand for
    # several reported groups: tune.same_as / shared_over).
    used = set()
    for r in main:
        rep = grid.tune.representative({a: grid_lib.as_value(r[a]) for a in grid.axes})
        group = tuple(grid_lib.fmt_value(rep[a]) for a in grid.axes)
        used.add((group, tuple(r[f] for f in fields)))
    header = [grid_lib.short(a) for a in grid.axes] + [
        ", ".join(grid_lib.short(f) for f in fields),
        "validation score per tuning seed",
        "mean",
        "used for reported cells",
    ]
    out = []
    for g, members in _groups(grid, tune).items():
        per: dict[tuple, list[dict[str, str]]] = {}
        for r in members:
            per.setdefault(tuple(r[f] for f in fields), []).append(r)
        for combo in sorted(per, key=lambda t: tuple(_sortable(x) for x in t)):
            rs = sorted(per[combo], key=lambda r: int(r["seed"]))
            scores = [(_num(r["val_score"]) or 0.0) if r["status"] in REPORTED else 0.0 for r in rs]
            shown = ", ".join(
                f"{s:.3f}" if r["status"] == "ok" else f"{r['status']} ({s:.3f})"
                for s, r in zip(scores, rs, strict=True)
            )
            out.append(
                [grid_lib.axis_label(a, v) for a, v in zip(grid.axes, g, strict=True)]
                + [
                    ", ".join(combo),
                    shown,
                    f"{sum(scores) / len(scores):.3f}",
                    "**yes**" if (g, combo) in used else "",
                ]
            )
    return results_lib.md_table(header, out)


def _sortable(x: str) -> tuple:
    try:
        return (0, float(x), "")
    except ValueError:
        return (1, 0.0, x)


def render_table(grid, rows: list[dict[str, str]], meta: dict[str, Any]) -> str:
    """``table.md`` of an evidence-format ``runs.csv`` (its rows) and ``meta.json``."""
    tune = [r for r in rows if r["stage"] == "tune"]
    main = [r for r in rows if r["stage"] == "main"]
    seconds = sum(_num(r["wall_seconds"]) or 0.0 for r in rows)
    commits = sorted({r["commit"] for r in rows if r["commit"]})
    metric = next((r["select_metric"] for r in rows if r["select_metric"]), "balanced_accuracy")
    parts = [
        f"# Experiment `{grid.name}`" + (" (--quick)" if grid.quick else "") + " (evidence method)",
        "",
        grid.description,
        "",
        f"- command: `{meta.get('command')}`",
        f"- git commit(s) of the rows: {', '.join(commits) or '-'}",
        f"- machine: {meta.get('machine')}; JAX devices: {meta.get('jax_devices')}",
        f"- runs: {len(main)} reported + {len(tune)} tuning; summed run time "
        f"{seconds / 3600:.2f} h",
        *(
            [
                f"- {meta['cells_reused']} of these runs have the same resolved config as a "
                "finished run of another grid and were copied from it, not rerun (the cell "
                "file's `reused_from` names it; its commit and run time are the original's)"
            ]
            if meta.get("cells_reused")
            else []
        ),
        f"- every cell: `{grid.base}` with {', '.join(f'`{s}`' for s in grid.set) or 'no changes'}",
        f"- selection on the **{grid.select_on}** split (held out of each client's training "
        f"data from the public seed) by {metric.replace('_', ' ')}: the tuned values (mean over "
        "the tuning seeds of each run's best round) and each reported run's round; the test "
        "split is read at the selected round and at the last round only",
        "- what epsilon covers: each run's training (its `epsilon_spent` in `runs.csv`), not "
        "the selection of its hyperparameters and reported round on the validation split, "
        "which is held out of the same private data; every run sets `privacy.noise_seed` so "
        "that its command reproduces it, so none is a private release "
        "([threat model](../../../docs/threat_model.md#not-covered))",
        "- regenerate: `ffa-jax experiment "
        + grid.name
        + (" --quick" if grid.quick else "")
        + " --table` (from `runs.csv` and `meta.json`); each row's exact command is in `runs.csv`",
        "",
    ]
    if main:
        parts += [
            "## Results (test split at the validation-selected round; mean ± 95% CI over seeds)",
            "",
            results_table(grid, main),
            "",
        ]
    if grid.claims and main:
        parts += ["## Verdicts", "", *claims_section(grid, main)]
    if main:
        parts += [
            "## Validation curves (reported runs, mean over seeds)",
            "",
            f"![validation curves]({CURVES_PNG})",
            "",
        ]
    if grid.tune is not None and tune:
        parts += [
            "## Tuning (validation split; every tuning run)",
            "",
            f"Tuning seeds {list(grid.tune.seeds)}; extended fields: "
            f"{', '.join(grid.tune.extend) or 'none'} (a choice at a grid edge adds a log step, "
            f"at most {grid.tune.max_extend} per side). A diverged run scores 0.",
            "",
            tuning_table(grid, tune, main),
            "",
        ]
    return "\n".join(parts)


def write_all(grid, out: Path, cells: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Writes ``runs.csv`` (every current cell, tuning included) and ``table.md``."""
    tune = results_lib.current_cells(grid, cells, "tune")
    main = results_lib.current_cells(grid, cells, "main")
    write_runs_csv(grid, out / "runs.csv", tune + main)
    # The validation curves of the reported runs (do the non-private runs plateau?).
    plots.curves_plot(
        grid, main, out / CURVES_PNG, "val_balanced_accuracy", "validation balanced accuracy"
    )
    regenerate(grid, out, meta)


def regenerate(grid, out: Path, meta: dict[str, Any] | None = None) -> str:
    """Rewrites ``out/table.md`` from ``out/runs.csv`` and ``out/meta.json``; returns it."""
    if meta is None:
        meta = json.loads((out / "meta.json").read_text())
    text = render_table(grid, read_runs_csv(out / "runs.csv"), meta)
    atomic_write_text(out / "table.md", text)
    return text


def is_evidence_csv(path: Path) -> bool:
    """Whether ``path`` is a ``runs.csv`` in the evidence format."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return FORMAT_COLUMN in header
