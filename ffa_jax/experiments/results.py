"""Results of an experiment, from its cell files: ``runs.csv``, ``table.md`` and PNG plots.

Tables report the mean and the 95% confidence interval of the mean over seeds (Student t,
``t_{0.975, n-1} * s / sqrt(n)``); a group with one seed shows no interval. A diverged run
(non-finite loss) has no accuracy: it is counted in the ``diverged`` column and left out of
the mean, so a method that diverges often is visibly flagged rather than silently averaged.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ffa_jax.experiments import grid as grid_lib
from ffa_jax.experiments import stats

CSV_FIELDS = (
    "stage",
    "cell_id",
    "seed",
    "status",
    "test_accuracy",
    "majority_accuracy",
    "test_loss",
    "final_train_loss",
    "epsilon",
    "uplink_bytes_per_client_per_round",
    "uplink_bytes_total",
    "rounds",
    "wall_seconds",
    "relative_gap",
    "max_abs_gap",
    "commit",
    "command",
)


def load_cells(cells_dir: Path, stage: str | None = None) -> list[dict[str, Any]]:
    """Every cell record in ``cells_dir`` (optionally one stage), in file-name order."""
    if not cells_dir.is_dir():
        return []
    out = [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]
    return [c for c in out if stage is None or c["stage"] == stage]


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, half-width of the 95% t interval)``; see :func:`ffa_jax.experiments.stats.mean_ci`."""
    return stats.mean_ci(values)


def fmt_ci(mean: float, half: float | None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    if half is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _acc(c: dict[str, Any]) -> float | None:
    return c.get("test_accuracy") if c.get("status") == "ok" else None


def _group_key(grid, cell: dict[str, Any]) -> tuple:
    return tuple((k, cell["axes"][k]) for k in grid.axes)


def current_cells(grid, cells: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """Cells of ``stage`` that belong to the grid as now defined (its axes, seeds, tuning)."""
    if stage == "tune":
        if grid.tune is None:
            return []
        stems = {c.file_stem for c in resolve_tuning(grid, cells)[0]}
    else:
        chosen = choose(grid, current_cells(grid, cells, "tune")) if grid.tune is not None else None
        if grid.tune is not None and chosen is None:
            return []
        stems = {c.file_stem for c in grid_lib.main_cells(grid, chosen)}
    return [c for c in cells if c.get("file_stem") in stems]


# Statuses whose validation-selected model is reported: a diverged run's is its best round
# before the divergence (``ffa_jax.run.loop.NonFiniteError.selected``).
REPORTED = ("ok", "diverged")


def selection_score(rec: dict[str, Any] | None) -> float:
    """A tuning run's score: its best validation metric over rounds (``selected_val_*``, see
    :class:`ffa_jax.run.loop.RoundSelector`), for a diverged run over the rounds before it
    diverged (its early-stopped model is as usable as a finished run's); 0 for a failed run or
    one that diverged before any validation."""
    if rec is None or rec.get("status") not in REPORTED:
        return 0.0
    v = next((v for k, v in rec.items() if k.startswith("selected_val_")), None)
    return 0.0 if v is None else float(v)


def resolve_tuning(grid, tune_cells: list[dict[str, Any]]):
    """``(cells, chosen)``: the tuning cells the grid needs given the finished ones, and
    ``{tune group: ((field, value), ...)}`` once all of them have run (else None).

    A candidate's score is the mean :func:`selection_score` over the tuning seeds (ties go to
    the earlier candidate). When the choice of a field listed in ``tune.extend`` sits at an
    edge of its grid, the grid grows by one log step beyond that edge (at most
    ``tune.max_extend`` per side) and the new candidates run too; every tuning run is kept."""
    if grid.tune is None:
        return [], None
    by_stem = {c.get("file_stem"): c for c in tune_cells}
    extensions: dict[tuple, dict[str, dict[str, int]]] = {}
    while True:
        cells = grid_lib.tune_cells(grid, extensions)
        if any(c.file_stem not in by_stem for c in cells):
            return cells, None
        scores: dict[tuple, dict[tuple, list[float]]] = {}
        for cell in cells:
            g = grid_lib.tune_group(grid, cell.axes)
            scores.setdefault(g, {}).setdefault(cell.tuned, []).append(
                selection_score(by_stem[cell.file_stem])
            )
        chosen = {}
        grew = False
        for g, per_combo in scores.items():
            order = list(per_combo)
            best = max(order, key=lambda t: (np.mean(per_combo[t]), -order.index(t)))
            chosen[g] = best
            point = dict(g)
            cands = grid_lib.group_candidates(grid, point, extensions)
            for field, value in best:
                if field not in grid.tune.extend:
                    continue
                values = sorted(float(v) for v in cands[field])
                sides = extensions.setdefault(g, {}).setdefault(field, {"low": 0, "high": 0})
                for side, edge in (("low", values[0]), ("high", values[-1])):
                    if float(value) == edge and sides[side] < grid.tune.max_extend:
                        sides[side] += 1
                        grew = True
        if not grew:
            return cells, chosen


def choose(grid, tune_cells: list[dict[str, Any]]) -> dict[tuple, Any] | None:
    """``{tune group: ((field, value), ...)}`` chosen on the validation split (see
    :func:`resolve_tuning`); None while some tuning cell the grid needs has not run."""
    return resolve_tuning(grid, tune_cells)[1]


def _sort_key(s: str) -> tuple:
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)


def _number(s: str) -> Any:
    try:
        f = float(s)
    except ValueError:
        return s
    return int(f) if f.is_integer() and "." not in s and "e" not in s else f


def write_csv(grid, path: Path, cells: list[dict[str, Any]]) -> None:
    # Full field names: a short name such as "epsilon" would clash with the spent epsilon.
    axes = list(grid.axes)
    tuned = list(grid.tune.fields) if grid.tune is not None else []
    fields = ["stage", "cell_id", "seed", *axes, *tuned, *CSV_FIELDS[3:]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for c in cells:
        row = dict(c)
        for a in grid.axes:
            row[a] = c["axes"].get(a)
        for f, v in grid_lib.tuned_values(c).items():
            row[f] = grid_lib.fmt_value(v)
        w.writerow({k: _csv_value(row.get(k)) for k in fields})
    path.write_text(buf.getvalue())


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def summarize(grid, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group of main cells (axis values): accuracy mean ± CI over seeds, etc."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(_group_key(grid, c), []).append(c)
    rows = []
    for key, members in groups.items():
        accs = [a for a in (_acc(c) for c in members) if a is not None]
        mean, half = mean_ci(accs)
        row = {
            "axes": dict(key),
            "n": len(members),
            "diverged": sum(c.get("status") == "diverged" for c in members),
            "errors": sum(c.get("status") == "error" for c in members),
            "acc_mean": mean,
            "acc_ci": half,
            "accs": accs,
            "majority": float(np.mean([c.get("majority_accuracy") or 0 for c in members])),
            "epsilon": members[0].get("epsilon"),
            "uplink": members[0].get("uplink_bytes_per_client_per_round"),
            "tuned": members[0].get("tuned"),
            "seconds": float(sum(c.get("wall_seconds", 0) for c in members)),
        }
        for k in ("relative_gap", "max_abs_gap"):
            if k in members[0]:
                row[k] = max(float(c.get(k) or 0.0) for c in members)
        rows.append(row)
    return sorted(rows, key=lambda r: grid_lib.axis_order(grid, r["axes"]))


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_table(grid, rows: list[dict[str, Any]]) -> str:
    axes = list(grid.axes)
    header = [grid_lib.short(a) for a in axes]
    if grid.tune is not None:
        header.append(f"{grid_lib.short(grid.tune.field)} (tuned)")
    header += ["test accuracy (mean ± 95% CI)", "majority class", "seeds", "diverged"]
    if grid.kind == "theorem1":
        header = [grid_lib.short(a) for a in axes] + ["max relative gap", "max abs gap"]
    out = []
    for r in rows:
        cells = [grid_lib.axis_label(a, r["axes"][a]) for a in axes]
        if grid.kind == "theorem1":
            out.append(cells + [f"{r['relative_gap']:.2e}", f"{r['max_abs_gap']:.2e}"])
            continue
        if grid.tune is not None:
            cells.append(grid_lib.tuned_label({"tuned": r["tuned"]}) if r["tuned"] else "-")
        cells += [
            fmt_ci(r["acc_mean"], r["acc_ci"]),
            f"{r['majority']:.3f}",
            str(r["n"]),
            str(r["diverged"]),
        ]
        out.append(cells)
    return md_table(header, out)


def tune_table(grid, cells: list[dict[str, Any]]) -> str:
    if grid.tune is None or not cells:
        return ""
    chosen = choose(grid, cells) or {}
    groups: dict[tuple, dict[str, list[float | None]]] = {}
    for c in sorted(cells, key=lambda c: grid_lib.axis_order(grid, c["axes"])):
        g = tuple(c["axes"].items())
        groups.setdefault(g, {}).setdefault(grid_lib.tuned_label(c), []).append(_acc(c))
    header = [grid_lib.short(a) for a in grid.axes] + ["candidate", "test accuracy", "chosen"]
    out = []
    for g, per_value in groups.items():
        pick = chosen.get(tuple((k, v) for k, v in g))
        for value, accs in sorted(per_value.items(), key=lambda kv: _sort_key(kv[0])):
            shown = ", ".join("diverged" if a is None else f"{a:.3f}" for a in accs)
            picked = pick is not None and grid_lib.tuned_label({"tuned": pick}) == value
            mark = "**yes**" if picked else ""
            out.append([grid_lib.axis_label(k, v) for k, v in g] + [value, shown, mark])
    return md_table(header, out)


def communication_table(grid, cells: list[dict[str, Any]], target: float, full_bytes) -> str:
    """Uplink per round and the uplink bytes until the test accuracy first reaches ``target``
    (evaluated every round), per cell group (mean over seeds that reached it)."""
    rows = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in sorted(cells, key=lambda c: grid_lib.axis_order(grid, c["axes"])):
        if c.get("status") == "ok":
            groups.setdefault(_group_key(grid, c), []).append(c)
    for key, members in groups.items():
        per_round = members[0]["uplink_bytes_per_client_per_round"]
        K = members[0]["history"][0]["uplink_bytes"] // max(per_round, 1)
        reached = []
        for c in members:
            hit = [h["round"] for h in c["history"] if (h.get("eval_accuracy") or 0) >= target]
            if hit:
                reached.append(hit[0] * per_round * K)
        mean, half = mean_ci(reached) if reached else (math.nan, None)
        rows.append(
            [grid_lib.axis_label(k, v) for k, v in key]
            + [
                f"{per_round:,}",
                f"{per_round * K:,}",
                f"{len(reached)}/{len(members)}",
                "-"
                if not reached
                else f"{mean / 1e6:.2f}" + ("" if half is None else f" ± {half / 1e6:.2f}"),
            ]
        )
    header = [grid_lib.short(a) for a in grid.axes] + [
        "uplink per client per round (bytes)",
        "uplink per round, all clients (bytes)",
        f"seeds reaching {target:g}",
        f"uplink to reach {target:g} (MB, mean ± 95% CI)",
    ]
    text = md_table(header, rows)
    if full_bytes:
        text += (
            f"\n\nFull fine-tuning would upload the whole model, {full_bytes:,} bytes per client per "
            "round (float32, every parameter including the head)."
        )
    return text


def noise_table(grid, cells: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in sorted(cells, key=lambda c: grid_lib.axis_order(grid, c["axes"])):
        if c.get("status") == "ok":
            groups.setdefault(_group_key(grid, c), []).append(c)
    header = [grid_lib.short(a) for a in grid.axes] + [
        "round",
        "‖ξ_B A‖",
        "‖B ξ_A‖",
        "‖ξ_B ξ_A‖",
        "total noise",
        "‖ΔW‖ of the round",
    ]
    out = []
    for key, members in groups.items():
        rounds = [h["round"] for h in members[0]["history"]]
        for r in sorted({rounds[0], rounds[len(rounds) // 2], rounds[-1]}):
            hs = [next(h for h in c["history"] if h["round"] == r) for c in members]
            m = {k: float(np.mean([h[k] for h in hs])) for k in hs[0] if k != "round"}
            total = math.sqrt(m["xiB_A"] ** 2 + m["B_xiA"] ** 2 + m["xiB_xiA"] ** 2)
            out.append(
                [grid_lib.axis_label(k, v) for k, v in key]
                + [str(r)]
                + [f"{m[k]:.3e}" for k in ("xiB_A", "B_xiA", "xiB_xiA")]
                + [f"{total:.3e}", f"{m['update_W']:.3e}"]
            )
    return md_table(header, out)


def write_all(grid, out: Path, cells: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Writes ``runs.csv`` (every cell), ``table.md`` and the plots."""
    from ffa_jax.experiments import plots

    tune = current_cells(grid, cells, "tune")
    main = current_cells(grid, cells, "main")
    write_csv(grid, out / "runs.csv", tune + main)
    rows = summarize(grid, main)
    parts = [
        f"# Experiment `{grid.name}`" + (" (--quick)" if grid.quick else ""),
        "",
        grid.description,
        "",
        f"- command: `{meta['command']}`",
        f"- ffa_jax {meta['ffa_jax_version']}, git commit(s) {', '.join(meta['commits'])}"
        + (" (uncommitted changes)" if meta.get("dirty") else ""),
        f"- machine: {meta['machine']}; JAX devices: {meta['jax_devices']}",
        f"- cells: {len(main)} reported + {len(tune)} tuning; summed cell wall time "
        f"{meta['cell_seconds_total'] / 60:.1f} min ({meta['started']} to {meta['updated']})",
        f"- every cell: `{grid.base}` with {', '.join(f'`{s}`' for s in grid.set) or 'no changes'}",
        "- each cell's exact command is in `runs.csv` (column `command`)",
        "",
    ]
    if rows:
        parts += ["## Results", "", main_table(grid, rows), ""]
    if grid.tune is not None and tune:
        parts += [
            "## Learning-rate tuning",
            "",
            f"Seeds {list(grid.tune.seeds)} (not the reported seeds); the candidate with the "
            "highest mean test accuracy is used for the reported cells"
            + "".join(
                f"; {grid_lib.short(k)}={v} reuses the choice at {grid_lib.short(k)}={grid_lib.fmt_value(w)}"
                for k, t in grid.tune.same_as.items()
                for v, w in t.items()
                if v != grid_lib.fmt_value(w)
            )
            + ".",
            "",
            tune_table(grid, tune),
            "",
        ]
    target = grid.probe.get("target_accuracy")
    if target is not None and main:
        parts += [
            "## Communication",
            "",
            communication_table(grid, main, float(target), meta.get("full_model_bytes")),
            "",
        ]
    if grid.kind == "noise_amplification" and main:
        parts += [
            "## Noise terms of one DP update (Frobenius norms, summed over target matrices)",
            "",
            noise_table(grid, main),
            "",
        ]
    pngs = plots.write_plots(grid, out, tune, main, rows, meta)
    for p in pngs:
        parts += [f"![{p.stem}]({p.name})", ""]
    (out / "table.md").write_text("\n".join(parts))
