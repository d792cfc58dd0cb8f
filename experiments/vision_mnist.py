"""The offline vision experiment: pretrain a ViT on public MNIST digits 0-4, then fine-tune it
privately (federated, DP-SGD per client) on digits 5-9 with LoRA vs FFA-LoRA at several
epsilons and seeds. Writes one JSON line per run and a markdown table.

    python experiments/vision_mnist.py --seeds 0 1 2          # from the repository root

Every run is ``ffa-jax train --config configs/vision_mnist.yaml`` with ``--set`` overrides
(``lora.mode``, ``privacy.epsilon``, ``seed``, ``data.partition`` and any ``--set`` given
here); the pretrained backbone (``model.name``) is trained first with
``configs/vision_pretrain_mnist.yaml`` if its folder does not exist. The "start" accuracy is
the model before fine-tuning (round 0: the pretrained backbone with the new head, B = 0).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from ffa_jax.config import load_config, load_pretrain_config
from ffa_jax.run import train
from ffa_jax.run.pretraining import pretrain


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def _command(config: str, overrides: list[str]) -> str:
    return " ".join(["ffa-jax train --config", config, *(f"--set {o}" for o in overrides)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/vision_mnist.yaml")
    p.add_argument("--pretrain-config", default="configs/vision_pretrain_mnist.yaml")
    p.add_argument("--modes", nargs="+", default=["lora", "ffa"])
    p.add_argument("--epsilons", nargs="+", default=["inf", "6", "3", "1"])
    p.add_argument("--partitions", nargs="+", default=["label_mix"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    # Without DP nothing is clipped: per-example gradient norms are ~5 here, so the DP runs'
    # lr 5 x clip 0.1 (a step of at most 0.5) corresponds to lr ~0.1-0.5 unclipped.
    p.add_argument(
        "--nonprivate-set",
        dest="nonprivate_overrides",
        action="append",
        default=None,
        help="extra overrides for epsilon=inf runs (default: client.learning_rate=0.5)",
    )
    p.add_argument("--out", type=Path, default=Path("experiments/results/vision_mnist"))
    args = p.parse_args()
    if args.nonprivate_overrides is None:
        args.nonprivate_overrides = ["client.learning_rate=0.5"]

    base = load_config(args.config, args.overrides)
    model_dir = Path(base.model.name)
    if not (model_dir / "config.json").is_file():
        pcfg = load_pretrain_config(
            args.pretrain_config, [f"output_dir={model_dir.parent}", f"name={model_dir.name}"]
        )
        print("pretraining:", json.dumps(pretrain(pcfg, progress=False)))
    pre = (
        json.loads((model_dir / "summary.json").read_text())
        if (model_dir / "summary.json").is_file()
        else {}
    )

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "runs.jsonl"
    # Earlier invocations' rows count too: cells already in runs.jsonl are not rerun, and the
    # table covers every row (the last one of a cell wins).
    done = (
        [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
        if results_path.is_file()
        else []
    )

    def _key(partition: str, mode: str, eps: float, seed: int) -> tuple:
        return (partition, mode, float(eps), int(seed))

    finished = {_key(r["partition"], r["mode"], r["epsilon_target"], r["seed"]) for r in done}
    # Seeds outermost: an interrupted sweep still has every cell for the first seeds.
    for seed in args.seeds:
        for partition in args.partitions:
            for eps in args.epsilons:
                for mode in args.modes:
                    if _key(partition, mode, float(eps), seed) in finished:
                        continue
                    name = f"{base.name}_{partition}_{mode}_eps{eps}_s{seed}"
                    private = math.isfinite(float(eps))
                    overrides = [
                        *args.overrides,
                        *([] if private else args.nonprivate_overrides),
                        f"name={name}",
                        f"seed={seed}",
                        # A research sweep: reproducible noise (not a private release).
                        f"privacy.noise_seed={seed}",
                        f"lora.mode={mode}",
                        f"privacy.epsilon={eps}",
                        f"data.partition={partition}",
                        "eval.baseline=true",
                    ]
                    cfg = load_config(args.config, overrides)
                    t0 = time.time()
                    s = train(cfg, overwrite=True, progress=False, log=lambda *a: None)
                    row = {
                        "partition": partition,
                        "mode": mode,
                        "epsilon_target": float(eps),
                        "seed": seed,
                        "learning_rate": cfg.client.learning_rate,
                        "start_accuracy": s.get("start_accuracy"),
                        "test_accuracy": s["test_accuracy"],
                        "epsilon_spent": s["epsilon"],
                        "wall_seconds": time.time() - t0,
                        # The same run alone from the command line (same number, same machine).
                        "command": _command(args.config, overrides),
                    }
                    print(json.dumps(row), flush=True)
                    with open(results_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.append(row)

    lines = [
        "# Vision: ViT pretrained on public MNIST 0-4, DP federated fine-tuning on 5-9",
        "",
        f"Pretrained backbone: test accuracy on digits 0-4 = {pre.get('test_accuracy', 'n/a')}"
        f" ({pre.get('test_examples', '?')} held-out images).",
        f"Config: `{args.config}` with {args.overrides or 'no overrides'}; epsilon=inf runs "
        f"also {args.nonprivate_overrides}; seeds "
        f"{sorted({r['seed'] for r in done if r['partition'] in args.partitions})}.",
        "Accuracy on the 500 held-out private images (%), mean ± std over seeds. Each row of "
        "`runs.jsonl` reruns alone as "
        f"`{_command(args.config, ['seed=S', 'lora.mode=M', 'privacy.epsilon=E', 'data.partition=P', 'eval.baseline=true'])}`"
        f" (plus `--set {' --set '.join(args.nonprivate_overrides)}` at epsilon=inf; rows "
        "written since the `command` field was added carry their exact command).",
        "",
        "| partition | epsilon | start | LoRA | FFA-LoRA |",
        "|---|---|---|---|---|",
    ]
    for partition in args.partitions:
        for eps in args.epsilons:
            latest = {
                _key(r["partition"], r["mode"], r["epsilon_target"], r["seed"]): r for r in done
            }
            rows = [
                r
                for r in latest.values()
                if r["partition"] == partition and r["epsilon_target"] == float(eps)
            ]
            start = [r["start_accuracy"] for r in rows if r["start_accuracy"] is not None]
            cells = []
            for mode in ("lora", "ffa"):
                acc = [r["test_accuracy"] for r in rows if r["mode"] == mode]
                cells.append(_fmt(acc) if acc else "-")
            e = "inf" if math.isinf(float(eps)) else eps
            lines.append(
                f"| {partition} | {e} | {_fmt(start) if start else '-'} | {cells[0]} | {cells[1]} |"
            )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
