"""The validation-curve plot: one panel per value of the last axis when there are many lines."""

import types

from ffa_jax.experiments import plots


def _cell(mode, eps, seed, base):
    hist = [{"round": r, "val_balanced_accuracy": base + 0.01 * r} for r in (1, 2, 3)]
    return {
        "status": "ok",
        "seed": seed,
        "axes": {"lora.mode": mode, "privacy.epsilon": eps},
        "history": hist,
    }


def test_curves_plot_many_groups_uses_one_panel_per_epsilon(tmp_path):
    modes = ["ffa", "lora", "fedsa", "rolora"]
    epsilons = ["inf", "6", "2"]
    grid = types.SimpleNamespace(
        name="variants", axes={"lora.mode": modes, "privacy.epsilon": epsilons}
    )
    main = [
        _cell(m, e, s, 0.5 + 0.05 * i)
        for i, m in enumerate(modes)
        for e in epsilons
        for s in (0, 1)
    ]
    out = plots.curves_plot(grid, main, tmp_path / "c.png", "val_balanced_accuracy", "val")
    assert out is not None and out.stat().st_size > 0
    # Few groups keep the single-panel plot: three panels make a figure twice as wide.
    few = [c for c in main if c["axes"]["privacy.epsilon"] == "inf"]
    single = plots.curves_plot(grid, few, tmp_path / "f.png", "val_balanced_accuracy", "val")
    plt = plots._plt()
    assert plt.imread(out).shape[1] > 1.8 * plt.imread(single).shape[1]
