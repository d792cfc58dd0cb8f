"""Run outputs meant for people: plots and a short markdown summary.

A metrics record keeps release-safe values at its top level and the values computed from
private data without noise (training loss, gradient norms, realised batch sizes...) in its
``diagnostics`` object; :func:`metric_value` reads either.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ffa_jax.federated import modes
from ffa_jax.fileio import atomic_write, atomic_write_text

#: What summary.md says epsilon covers.
COVERAGE = (
    "Epsilon covers the trained adapter (every released update) and the numbers derived from "
    "it: the evaluation metrics on the held-out split and the norm of the averaged update. It "
    "does NOT cover the diagnostics (training loss, gradient norms, clipped fractions, "
    "realised batch sizes, pre-noise client update norms): they are computed from the "
    "clients' private data without noise; keep them with the operator."
)


def metric_value(record: dict[str, Any], name: str, default: Any = None) -> Any:
    """``record[name]``, or ``record["diagnostics"][name]`` for a diagnostic."""
    if name in record:
        return record[name]
    return (record.get("diagnostics") or {}).get(name, default)


def write_plots(
    plot_dir: Path,
    history: list[dict[str, Any]],
    *,
    metric: str = "eval_accuracy",
    metric_title: str = "test accuracy",
    mode: int | None = None,
) -> Path:
    """``metrics.png``: training loss, the test ``metric`` and epsilon spent vs round (a
    round-0 record, the pretrained model's evaluation, appears in the metric panel only),
    written atomically with permission bits ``mode`` (``None``: the umask's)."""
    # The object-oriented API, without pyplot: no GUI backend or global figure state (and
    # ~0.3 s less import at the end of every run).
    from matplotlib.figure import Figure

    plot_dir.mkdir(parents=True, exist_ok=True)
    trained = [h for h in history if metric_value(h, "train_loss") is not None]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(
        [h["round"] for h in trained],
        [metric_value(h, "train_loss") for h in trained],
        marker="o",
        ms=3,
    )
    axes[0].set(
        title="training loss (diagnostic, not covered by epsilon)",
        xlabel="round",
        ylabel="cross-entropy",
    )
    ev = [(h["round"], h[metric]) for h in history if metric in h]
    if ev:
        axes[1].plot(*zip(*ev, strict=True), marker="o", ms=4, color="tab:green")
    axes[1].set(title=metric_title, xlabel="round", ylabel=metric_title)
    eps = [(h["round"], h["epsilon"]) for h in trained if math.isfinite(h["epsilon"])]
    if eps:
        axes[2].plot(*zip(*eps, strict=True), marker="o", ms=3, color="tab:red")
        axes[2].set(
            title=f"privacy spent (delta={history[-1]['delta']:g})",
            xlabel="round",
            ylabel="epsilon",
        )
    else:
        axes[2].text(0.5, 0.5, "non-private run\n(epsilon = inf)", ha="center", va="center")
        axes[2].set(title="privacy spent", xlabel="round")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = plot_dir / "metrics.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), mode=mode)
    return path


def _fmt_eps(e: float) -> str:
    return "inf (non-private)" if not math.isfinite(e) else f"{e:.3f}"


def _fmt_num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fmt_opt(e) -> str:
    return "n/a" if e is None else _fmt_eps(e)


def _privacy_details(cfg, prep, summary) -> str:
    fed = cfg.federated
    who = (
        f"; {fed.clients_per_round} of {fed.clients} clients per round ({fed.client_sampling})"
        if fed.partial
        else ""
    )
    if not cfg.privacy.enabled:
        return who
    p = cfg.privacy
    if p.unit == "client":
        return (
            f", delta {summary['delta']:.3g}, **client-level** (DP-FedAvg: neighbours differ in one whole "
            f"client; the server is trusted), client clip norm S {p.client_clip_norm:g}, "
            f"server noise multiplier z {prep.plan.client_noise_multiplier:.4f}, accountant "
            f"{p.accountant}{who}"
        )
    return (
        f", delta {summary['delta']:.3g}, **sample-level** per client (neighbours differ in one example of "
        f"one client), clip norm {p.clip_norm:g}, accountant {p.accountant}, noise multipliers "
        f"{[round(float(s), 4) for s in prep.noise_multipliers]}{who}"
    )


def write_summary(
    path: Path,
    cfg,
    prep,
    history: list[dict[str, Any]],
    summary: dict[str, Any],
    *,
    mode: int | None = None,
) -> Path:
    """``summary.md`` of a finished run, written atomically with permission bits ``mode``."""
    last = history[-1]
    lines = [
        f"# Run `{cfg.name}`",
        "",
        f"- method: **{modes.spec(cfg.lora.mode).title}** (r={cfg.lora.rank}, alpha={cfg.lora.alpha:g}, "
        f"{len(prep.target_paths)} target matrices)",
        f"- model: `{cfg.model.name}`, max_length {cfg.model.max_length}; task `{cfg.data.task}`",
        f"- federation: {cfg.federated.clients} clients, partition `{cfg.data.partition}`, "
        f"{cfg.federated.rounds} rounds x {cfg.federated.local_steps} local steps, "
        f"expected batch {cfg.client.batch_size}, client {cfg.client.optimizer} lr {cfg.client.learning_rate:g}, "
        f"server {cfg.server.optimizer} lr {cfg.server.learning_rate:g}",
        f"- privacy: epsilon {_fmt_eps(summary['epsilon'])}" + _privacy_details(cfg, prep, summary),
        *([f"- speed settings: {prep.perf.describe()}"] if getattr(prep, "perf", None) else []),
        "",
        "## Result",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in prep.workload.result_rows(summary, history)),
        f"| epsilon spent | {_fmt_eps(summary['epsilon'])} |",
        f"| epsilon (PLD / RDP) | {_fmt_opt(summary.get('epsilon_pld'))} / "
        f"{_fmt_opt(summary.get('epsilon_rdp'))} |",
        f"| uplink per client per round | {summary['uplink_bytes_per_client_per_round']:,} bytes |",
        f"| uplink total | {summary['uplink_bytes_total']:,} bytes |",
        f"| wall time | {summary['wall_seconds']:.1f} s |",
        "",
        "## Privacy",
        "",
        f"- {COVERAGE}",
        f"- noise: {summary.get('noise', 'n/a')}",
        "",
        "## Diagnostics (not covered by epsilon)",
        "",
        "| diagnostic | value |",
        "|---|---|",
        f"| final training loss | {_fmt_num(metric_value(last, 'train_loss'))} |",
        "",
        "## Clients",
        "",
        "```",
        prep.partition_table,
        "```",
        "",
        "![metrics](plots/metrics.png)",
        "",
    ]
    if prep.workload.notes:
        lines += ["## Data", "", *(f"- {n}" for n in prep.workload.notes), ""]
    lines += _samples_section(history)
    atomic_write_text(path, "\n".join(lines), mode=mode)
    return path


def _fence(text: str) -> list[str]:
    return ["```text", text.replace("```", "'''"), "```"]


def _samples_section(history: list[dict[str, Any]]) -> list[str]:
    """Sample generations of the pretrained model (round 0) and of the last evaluation."""
    evals = [h for h in history if h.get("eval_samples")]
    if not evals:
        return []
    picked = [evals[-1]] if evals[0] is evals[-1] else [evals[0], evals[-1]]
    lines = ["## Sample generations", ""]
    for h in picked:
        when = "pretrained model (round 0)" if h["round"] == 0 else f"after round {h['round']}"
        lines += [f"### {when}", ""]
        for s in h["eval_samples"]:
            mark = "correct" if s.get("correct") else "wrong"
            lines += [
                f"**{s.get('id', '')}**: reference `{s.get('reference')}`, predicted "
                f"`{s.get('predicted')}` ({mark})",
                "",
                "Question:",
                *_fence(str(s.get("question", ""))),
                "Generation:",
                *_fence(str(s.get("generation", ""))),
                "",
            ]
    return lines
