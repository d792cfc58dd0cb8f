"""PNG plots of an experiment (matplotlib, Agg): axes labelled with units, a legend per panel."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from ffa_jax.experiments import grid as grid_lib

LABELS = {
    "privacy.epsilon": "privacy budget ε (δ = 1e-5; inf = non-private)",
    "lora.alpha": "LoRA alpha",
    "lora.rank": "LoRA rank r",
    "data.partition": "partition",
    "data.dirichlet_alpha": "Dirichlet concentration",
    "client.learning_rate": "client learning rate",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ordered(grid, cells):
    return sorted(cells, key=lambda c: grid_lib.axis_order(grid, c["axes"]))


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)
    tmp.replace(path)
    return path


def _hue_axis(grid) -> str | None:
    return "lora.mode" if "lora.mode" in grid.axes else None


def _x_axis(grid) -> str | None:
    hue = _hue_axis(grid)
    rest = [a for a in grid.axes if a != hue]
    return rest[0] if rest else None


def _label(field: str | None, value: str) -> str:
    if field == "lora.mode":
        return grid_lib.axis_label(field, value)
    return f"{grid_lib.short(field)}={value}" if field else value


def accuracy_plot(grid, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Test accuracy (mean ± 95% CI over seeds) vs the first non-method axis, one line per
    method, one panel per combination of the remaining axes."""
    x_axis, hue = _x_axis(grid), _hue_axis(grid)
    if not rows:
        return None
    facets_axes = [a for a in grid.axes if a not in (x_axis, hue)]
    facets = list(
        itertools.product(*[[grid_lib.fmt_value(v) for v in grid.axes[a]] for a in facets_axes])
    )
    plt = _plt()
    fig, axes = plt.subplots(1, len(facets), figsize=(5.2 * len(facets), 3.8), squeeze=False)
    xs = [grid_lib.fmt_value(v) for v in grid.axes[x_axis]] if x_axis else ["all"]
    hues = [grid_lib.fmt_value(v) for v in grid.axes[hue]] if hue else [None]
    for ax, facet in zip(axes[0], facets, strict=True):
        want = dict(zip(facets_axes, facet, strict=True))
        for i, h in enumerate(hues):
            pts = []
            for j, x in enumerate(xs):
                for r in rows:
                    a = r["axes"]
                    if (
                        (hue is None or a[hue] == h)
                        and (x_axis is None or a[x_axis] == x)
                        and all(a[k] == v for k, v in want.items())
                    ):
                        if not math.isnan(r["acc_mean"]):
                            pts.append(
                                (
                                    j + (i - (len(hues) - 1) / 2) * 0.06,
                                    r["acc_mean"],
                                    r["acc_ci"] or 0.0,
                                )
                            )
            if pts:
                px, py, pe = zip(*pts, strict=True)
                ax.errorbar(
                    px, py, yerr=pe, marker="o", capsize=3, label=_label(hue, h) if h else "runs"
                )
        maj = [r["majority"] for r in rows]
        if maj:
            ax.axhline(float(np.mean(maj)), color="gray", ls="--", lw=1, label="majority class")
        ax.set_xticks(range(len(xs)), xs)
        ax.set(
            xlabel=LABELS.get(x_axis, grid_lib.short(x_axis)) if x_axis else "",
            ylabel="test accuracy",
            title=", ".join(_label(k, v) for k, v in want.items()) or grid.name,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{grid.name}: mean ± 95% CI over seeds", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def tuning_plot(grid, tune: list[dict[str, Any]], path: Path) -> Path | None:
    if grid.tune is None or not tune:
        return None
    groups: dict[tuple, dict[float, list[float]]] = {}
    for c in tune:
        acc = c.get("test_accuracy") if c.get("status") == "ok" else 0.0
        g = tuple(c["axes"].items())
        value = grid_lib.tuned_values(c)[grid.tune.field]
        groups.setdefault(g, {}).setdefault(float(value), []).append(acc)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for g, per in groups.items():
        xs = sorted(per)
        ax.plot(
            xs,
            [np.mean(per[x]) for x in xs],
            marker="o",
            label=", ".join(_label(k, v) for k, v in g),
        )
    ax.set_xscale("log")
    ax.set(
        xlabel=f"{LABELS.get(grid.tune.field, grid.tune.field)} (log scale)",
        ylabel="test accuracy (tuning seeds; diverged = 0)",
        title=f"{grid.name}: learning-rate tuning",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def curves_plot(
    grid, main: list[dict[str, Any]], path: Path, metric: str, ylabel: str
) -> Path | None:
    """``metric`` vs round, mean over seeds, one line per group."""
    groups: dict[tuple, list[list[tuple[int, float]]]] = {}
    for c in _ordered(grid, main):
        if c.get("status") != "ok":
            continue
        pts = [(h["round"], h[metric]) for h in c["history"] if h.get(metric) is not None]
        if pts:
            groups.setdefault(tuple(c["axes"].items()), []).append(pts)
    if not groups:
        return None
    plt = _plt()
    means = {}
    for g, runs in groups.items():
        rounds = sorted({r for run in runs for r, _ in run})
        ys = [np.mean([v for run in runs for r2, v in run if r2 == r]) for r in rounds]
        means[g] = (rounds, ys)
    axis_names = [k for k, _ in next(iter(groups))]
    if len(groups) <= 8 or len(axis_names) < 2:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for g, (rounds, ys) in means.items():
            ax.plot(rounds, ys, marker="o", ms=3, label=", ".join(_label(k, v) for k, v in g))
        ax.set(xlabel="round", ylabel=ylabel, title=f"{grid.name}: {ylabel} (mean over seeds)")
        _integer_x(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return _save(fig, path)
    # Many groups (e.g. 8 methods x 3 epsilons): one panel per value of the last axis, one
    # colour per remaining combination, shared y axis and one legend, so lines stay legible.
    panel_axis = axis_names[-1]
    # (panel value, the group's other axis values) -> its mean curve.
    by_panel = {
        (dict(g)[panel_axis], tuple((k, v) for k, v in g if k != panel_axis)): curve
        for g, curve in means.items()
    }
    panels = list(dict.fromkeys(pv for pv, _ in by_panel))
    series = list(dict.fromkeys(sk for _, sk in by_panel))
    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels) + 2.2, 3.8), sharey=True, squeeze=False
    )
    for ax, pv in zip(axes[0], panels, strict=True):
        for i, sk in enumerate(series):
            if (pv, sk) not in by_panel:
                continue
            rounds, ys = by_panel[(pv, sk)]
            label = ", ".join(_label(k, v) for k, v in sk)
            ax.plot(rounds, ys, marker="o", ms=3, color=colors(i), label=label)
        ax.set(xlabel="round", title=_label(panel_axis, pv))
        _integer_x(ax)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    # One legend entry per series, from whichever panel has it.
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="center right", fontsize=8)
    fig.suptitle(f"{grid.name}: {ylabel} (mean over seeds)")
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (3.6 * len(panels) + 2.2), 1))
    return _save(fig, path)


def communication_plot(grid, main, path: Path, target: float, full_bytes) -> Path | None:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in _ordered(grid, main):
        if c.get("status") == "ok":
            groups.setdefault(tuple(c["axes"].items()), []).append(c)
    if not groups:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names, per_round = [], []
    for g, runs in groups.items():
        label = ", ".join(_label(k, v) for k, v in g)
        hist = runs[0]["history"]
        rounds = [h["round"] for h in hist if h.get("eval_accuracy") is not None]
        accs = [
            np.mean(
                [next(h["eval_accuracy"] for h in c["history"] if h["round"] == r) for c in runs]
            )
            for r in rounds
        ]
        mb = [r * hist[0]["uplink_bytes"] / 1e6 for r in rounds]
        axes[0].plot(mb, accs, marker="o", ms=3, label=label)
        names.append(label)
        per_round.append(hist[0]["uplink_bytes"] / 1e6)
    axes[0].axhline(target, color="gray", ls=":", lw=1, label=f"target {target:g}")
    axes[0].set(
        xlabel="cumulative uplink, all clients (MB)",
        ylabel="test accuracy",
        title="accuracy vs uplink",
    )
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    K = main[0]["history"][0]["uplink_bytes"] // max(
        main[0]["uplink_bytes_per_client_per_round"], 1
    )
    if full_bytes:
        names.append("full fine-tuning")
        per_round.append(full_bytes * K / 1e6)
    axes[1].barh(
        names,
        per_round,
        color=["tab:blue"] * (len(names) - bool(full_bytes)) + ["tab:gray"] * bool(full_bytes),
    )
    axes[1].set_xscale("log")
    axes[1].set(xlabel="uplink per round, all clients (MB, log scale)", title="bytes per round")
    axes[1].grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)


def noise_plot(grid, main, path: Path) -> Path | None:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in _ordered(grid, main):
        if c.get("status") == "ok":
            groups.setdefault(tuple(c["axes"].items()), []).append(c)
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"xiB_A": "-", "B_xiA": "--", "xiB_xiA": ":"}
    names = {"xiB_A": "‖ξ_B A‖", "B_xiA": "‖B ξ_A‖", "xiB_xiA": "‖ξ_B ξ_A‖"}
    colors = itertools.cycle(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])
    for g, runs in groups.items():
        color = next(colors)
        label = ", ".join(_label(k, v) for k, v in g)
        rounds = [h["round"] for h in runs[0]["history"]]
        for term, ls in styles.items():
            ys = [np.mean([c["history"][i][term] for c in runs]) for i in range(len(rounds))]
            if max(ys) == 0:
                continue
            ax.plot(
                rounds, ys, ls=ls, color=color, marker="o", ms=3, label=f"{label}: {names[term]}"
            )
        ys = [np.mean([c["history"][i]["update_W"] for c in runs]) for i in range(len(rounds))]
        ax.plot(rounds, ys, ls="-.", color=color, alpha=0.4, label=f"{label}: ‖ΔW‖ of the round")
    ax.set_yscale("log")
    ax.set(
        xlabel="round (the update is taken from the server state at the start of the round)",
        ylabel="Frobenius norm (weight units, log scale)",
        title="noise terms of one DP-SGD update (Figure 1 of the paper)",
    )
    _integer_x(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def theorem1_plot(grid, main, path: Path) -> Path | None:
    runs = [c for c in main if c.get("status") == "ok"]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in runs:
        s, ref = c["scaled"], c["reference"]
        label = (
            f"{_label('lora.mode', c['axes']['lora.mode'])}: α={ref['alpha']:g}, lr={ref['lr']:g}, C={ref['clip_norm']:g}"
            f" vs α={s['alpha']:g}, lr={s['lr']:.4g}, C={s['clip_norm']:.4g} (seed {c['seed']})"
        )
        rounds = [h["round"] for h in c["history"]]
        ys = [max(h["relative_gap"], 1e-12) for h in c["history"]]
        ax.plot(rounds, ys, marker="o", label=label)
    ax.set_yscale("log")
    ax.set(
        xlabel="round",
        ylabel="‖W_ref − W_scaled‖_F / ‖W_ref − W0‖_F (log)",
        title="Theorem 1: FFA-LoRA's alpha is a learning-rate change (floor 1e-12)",
    )
    _integer_x(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(grid, out: Path, tune, main, rows, meta) -> list[Path]:
    made = []
    if grid.kind == "train":
        made.append(accuracy_plot(grid, rows, out / "accuracy.png"))
        made.append(tuning_plot(grid, tune, out / "tuning.png"))
        made.append(curves_plot(grid, main, out / "train_loss.png", "train_loss", "training loss"))
        target = grid.probe.get("target_accuracy")
        if target is not None:
            made.append(
                communication_plot(
                    grid,
                    main,
                    out / "communication.png",
                    float(target),
                    meta.get("full_model_bytes"),
                )
            )
    elif grid.kind == "noise_amplification":
        made.append(noise_plot(grid, main, out / "noise_terms.png"))
    else:
        made.append(theorem1_plot(grid, main, out / "theorem1.png"))
    return [p for p in made if p is not None]
