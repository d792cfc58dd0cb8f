"""``ffa-jax``: the command-line interface.

ffa-jax train [--config configs/quickstart.yaml] [--set section.field=value ...] [--overwrite]
ffa-jax train --resume RUN_DIR [--set section.field=value ...]   # continue from its checkpoint
ffa-jax config [--config ...] [--set ...]      # print the resolved, validated config
ffa-jax export-peft RUN_DIR OUT_DIR            # the run's adapter in HF PEFT format
ffa-jax experiment NAME [--quick] [--seeds ...]  # run experiments/grids/NAME.yaml (resumes)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from ffa_jax.errors import ConfigError, FfaJaxError


def default_config_path() -> Path | None:
    """``configs/quickstart.yaml`` of the working tree if present; else None (the built-in
    defaults of :class:`ffa_jax.config.RunConfig`, which are the quickstart's)."""
    local = Path("configs/quickstart.yaml")
    return local if local.is_file() else None


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML run config (default: configs/quickstart.yaml)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set lora.mode=lora --set privacy.epsilon=inf (repeatable)",
    )


def _load(args):
    from ffa_jax.config import load_config

    return load_config(args.config or default_config_path(), args.overrides)


def cmd_train(args) -> int:
    from ffa_jax.train import resume_config, train

    if args.resume is not None:
        if args.config is not None:
            raise ConfigError(
                "--config cannot be combined with --resume: a resumed run uses RUN_DIR/config.yaml "
                "(change the fields that may change with --set)."
            )
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = _load(args)
    summary = train(
        cfg,
        overwrite=args.overwrite,
        resume=args.resume is not None,
        progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_privacy(args) -> int:
    from ffa_jax.data.batching import physical_batch_size
    from ffa_jax.data.clients import load_clients
    from ffa_jax.privacy import planner

    cfg = _load(args)
    _, parts = load_clients(cfg)
    plan = planner.sample_level_plan(
        client_sizes=[len(p) for p in parts],
        batch_size=cfg.client.batch_size,
        max_batch_size=physical_batch_size(cfg.client.batch_size),
        rounds=cfg.federated.rounds,
        local_steps=cfg.federated.local_steps,
        epsilon=cfg.privacy.epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        noise_multiplier=cfg.privacy.noise_multiplier,
    )
    alt = planner.alternatives(
        plan,
        batch_size=cfg.client.batch_size,
        rounds=cfg.federated.rounds,
        local_steps=cfg.federated.local_steps,
        epsilon=cfg.privacy.epsilon,
    )
    if args.png:
        if not plan.private:
            raise ConfigError("--png needs a private run (privacy.epsilon is inf).")
        planner.plot_curve(plan, args.png)
    if args.json:
        print(json.dumps({**plan.to_json(), "alternatives": alt}))
    else:
        print(planner.format_plan(plan, alt))
    return 0


def cmd_bench(args) -> int:
    from ffa_jax.bench import BenchSpec, run_bench, to_markdown, write_report

    if args.quick:
        spec = BenchSpec(
            model="tiny", batch_size=4, seq_len=16, local_steps=2, clients=2, repeats=2
        )
    else:
        spec = BenchSpec(
            model=args.model,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            local_steps=args.local_steps,
            clients=args.clients,
            repeats=args.repeats,
        )
    report = run_bench(spec)
    write_report(report, args.out)
    print(to_markdown(report))
    return 0


def cmd_experiment(args) -> int:
    from ffa_jax.experiments.runner import run_experiment

    command = "ffa-jax experiment " + " ".join(
        shlex.quote(a) for a in (args.argv if args.argv is not None else sys.argv[2:])
    )
    res = run_experiment(
        args.name,
        quick=args.quick,
        seeds=args.seeds,
        out=args.out,
        overrides=args.overrides,
        command=command.strip(),
        dry_run=args.dry_run,
        tune_only=args.tune_only,
    )
    print(json.dumps(res, indent=2))
    return 0


def cmd_config(args) -> int:
    print(_load(args).to_yaml(), end="")
    return 0


def cmd_export_peft(args) -> int:
    import warnings

    from ffa_jax.models.peft import export_peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caveats are printed below
        res = export_peft(
            args.run_dir,
            args.out_dir,
            merged=not args.no_merged,
            num_labels=args.num_labels,
            overwrite=args.overwrite,
        )
    for w in res.warnings:
        print(f"ffa-jax: warning: {w}", file=sys.stderr)
    print(f"PEFT adapter: {res.out_dir} (base model {res.base_model}, num_labels={res.num_labels})")
    if res.merged_dir is not None:
        print(f"merged HF checkpoint: {res.merged_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffa-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run federated (FFA-)LoRA fine-tuning")
    _add_config_args(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run directory of the same name",
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint (bit-identical to an "
        "uninterrupted run)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("privacy", help="plan the privacy budget of a config without training")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--png", type=Path, default=None, help="also plot epsilon vs round to this PNG")
    p.set_defaults(func=cmd_privacy)

    p = sub.add_parser("bench", help="time DP vs non-DP, FFA vs LoRA client updates and a round")
    p.add_argument("--model", choices=["tiny", "minilm", "roberta-base"], default="minilm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny model, small batch, 2 repeats (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/bench"))
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "experiment",
        help="run an experiment grid (experiments/grids/NAME.yaml), resuming finished cells",
    )
    p.add_argument("name", help="grid name (experiments/grids/NAME.yaml) or a grid YAML path")
    p.add_argument("--quick", action="store_true", help="the grid's tiny CI size")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="replace the grid's reported seeds"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default experiments/results/NAME, or NAME-quick with --quick)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field in every cell (recorded with the results)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    p.add_argument(
        "--tune-only", action="store_true", help="run only the learning-rate tuning cells"
    )
    p.set_defaults(func=cmd_experiment, argv=None)

    p = sub.add_parser("config", help="print the resolved and validated config")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "export-peft", help="write a run's adapter in HF PEFT format (+ a merged HF checkpoint)"
    )
    p.add_argument("run_dir", type=Path, help="a finished run directory, e.g. runs/quickstart")
    p.add_argument("out_dir", type=Path, help="the adapter folder to write")
    p.add_argument("--no-merged", action="store_true", help="skip the merged checkpoint (merged/)")
    p.add_argument("--num-labels", type=int, default=None, help="if the run cannot tell")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    p.set_defaults(func=cmd_export_peft)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is cmd_experiment and argv is not None:
        args.argv = list(argv[1:])
    try:
        return args.func(args)
    except FfaJaxError as e:
        print(f"ffa-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
