"""``ffa-jax``: the command-line interface.

ffa-jax train [--config configs/quickstart.yaml] [--set section.field=value ...] [--overwrite]
ffa-jax train --resume RUN_DIR [--set section.field=value ...]   # continue from its checkpoint
ffa-jax train --distributed [--coordinator HOST:PORT --num-processes N --process-id I] ...
                                               # one process per host, clients across hosts
ffa-jax config [--config ...] [--set ...]      # print the resolved, validated config
ffa-jax audit [--config ...] [--set ...] [--canaries M] [--guesses R] [--confidence 0.95]
              [--client K] [--out DIR] [--json]  # one-run empirical privacy audit of the run
ffa-jax pretrain [--config configs/vision_pretrain_mnist.yaml] [--set ...]  # central ViT
ffa-jax export-peft RUN_DIR OUT_DIR [--base-model HUB_ID]  # the run's adapter in HF PEFT format
ffa-jax generate RUN_DIR --prompt TEXT | --input FILE.jsonl [--output FILE]  # decoder runs
ffa-jax predict RUN_DIR --input FILE [--output FILE]  # classifier runs: .jsonl texts, .npy images
ffa-jax eval RUN_DIR [--split test] [--json]   # re-evaluate the run's adapter, its metrics
ffa-jax flower app OUT_DIR [--config ...] [--set ...]   # a Flower App folder for `flwr run`
ffa-jax flower local [--config ...] [--set ...] [--resume]  # SuperLink + SuperNodes on 127.0.0.1
ffa-jax experiment NAME [NAME ...] [--quick]    # run experiments/grids/NAME.yaml (resumes)
ffa-jax experiment NAME --table                  # table.md from the committed runs.csv

Exit codes: 0 success; 2 bad input (ffa-jax: error: ...); 3 ``ffa-jax audit`` detected a
privacy violation (the empirical epsilon lower bound exceeds the run's claimed epsilon).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ffa_jax.config import CPU_LIBRARY_FUSIONS
from ffa_jax.errors import ConfigError, FederationError, FfaJaxError
from ffa_jax.fileio import atomic_write_text
from ffa_jax.version import __version__, git_state


def default_config_path() -> Path | None:
    """``configs/quickstart.yaml`` of the working tree if present; else None (the built-in
    defaults of :class:`ffa_jax.config.RunConfig`, which are the quickstart's)."""
    local = Path("configs/quickstart.yaml")
    return local if local.is_file() else None


def _add_config_args(
    p: argparse.ArgumentParser,
    default: str = "configs/quickstart.yaml if present, else the built-in defaults, which are "
    "the quickstart's",
    set_example: str = "--set lora.mode=lora --set privacy.epsilon=inf",
) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="YAML|NAME",
        help="a YAML config file, or the name of a config shipped with ffa_jax (quickstart, "
        f"glue/sst2, ...: `ffa-jax config --help` lists them) (default: {default})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=f"override a config field, e.g. {set_example} (repeatable)",
    )


def _add_json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help=f"machine-readable: print {what} as one JSON line on stdout; logs, warnings and "
        "progress go to stderr",
    )


def _emit(args, obj) -> None:
    """Prints ``obj`` as one JSON line on the command's real stdout (under ``--json`` every
    other print of the command goes to stderr; see :func:`main`)."""
    print(json.dumps(obj, default=str), file=args.stdout, flush=True)


def _load(args):
    from ffa_jax.config import load_config

    return load_config(args.config or default_config_path(), args.overrides)


def cmd_train(args) -> int:
    if args.distributed:
        # Before any other JAX use: jax.devices() then lists every process's devices.
        from ffa_jax import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise ConfigError(
            "--coordinator / --num-processes / --process-id need --distributed (a multi-process "
            "run); drop them for a single-process run."
        )
    from ffa_jax.run import resume_config, train

    if args.resume is not None:
        if args.config is not None:
            raise ConfigError(
                "--config cannot be combined with --resume: a resumed run uses RUN_DIR/config.yaml "
                "(change the fields that may change with --set)."
            )
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = _load(args)
    from ffa_jax import xla_options

    # Before the first compilation: a rerun of the same shapes loads its executables.
    xla_options.enable_compilation_cache(cfg.perf.compilation_cache)
    summary = train(
        cfg,
        overwrite=args.overwrite,
        resume=args.resume is not None,
        progress=not args.no_progress,
    )
    import jax

    if jax.process_index() == 0:  # process 0 reports a multi-process run
        if args.json:
            _emit(args, summary)
        else:
            print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_pretrain(args) -> int:
    from ffa_jax.config import load_pretrain_config
    from ffa_jax.run.pretraining import pretrain

    cfg = load_pretrain_config(args.config, args.overrides)
    summary = pretrain(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    if args.json:
        _emit(args, summary)
    else:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_privacy(args) -> int:
    from ffa_jax import perf, workloads
    from ffa_jax.data.clients import partition_clients
    from ffa_jax.run import planner

    cfg = _load(args)
    labels, names = workloads.train_labels(cfg)
    parts = partition_clients(cfg, labels, len(names))
    # The B_max that ffa-jax train accounts for (padded to the micro-batch; backend-free).
    plan = planner.make_plan(
        cfg,
        [len(p) for p in parts],
        perf.max_batch_size(cfg.perf, cfg.client.batch_size, perf.batch_overflow_probability(cfg)),
    )
    alt = planner.alternatives(
        plan,
        batch_size=cfg.client.batch_size,
        rounds=cfg.federated.rounds,
        local_steps=cfg.federated.local_steps,
        epsilon=cfg.privacy.epsilon,
        seed=cfg.seed,
    )
    if args.png:
        if not plan.private:
            raise ConfigError("--png needs a private run (privacy.epsilon is inf).")
        planner.plot_curve(plan, args.png)
    if args.json:
        _emit(args, {**plan.to_json(), "alternatives": alt})
    else:
        print(planner.format_plan(plan, alt))
    cap = cfg.privacy.max_epsilon
    if cap is not None and plan.private and plan.epsilon > cap:
        print(
            f"ffa-jax: warning: the plan spends epsilon={plan.epsilon:.4f} > "
            f"privacy.max_epsilon={cap:g}; ffa-jax train would refuse to start.",
            file=sys.stderr,
        )
    return 0


def cmd_plan(args) -> int:
    """``ffa-jax plan``: XLA's per-device memory of the config's round vs the device memory
    (:mod:`ffa_jax.run.memplan`); exit status 1 when it does not fit."""
    from ffa_jax.run import memplan

    cfg = _load(args)
    plan = memplan.plan_memory(
        cfg,
        device_memory=memplan.parse_memory(args.device_memory),
        devices=args.devices,
        backend=args.backend,
        exact=args.exact,
    )
    if args.json:
        _emit(args, plan.as_dict())
    else:
        print(memplan.describe(plan))
    return 0 if plan.fits else 1


def cmd_bench(args) -> int:
    from ffa_jax.bench import MEMORY_BUDGET_MB, BenchSpec, run_bench, to_markdown, write_report
    from ffa_jax.bench.allocator_ab import require_tcmalloc
    from ffa_jax.bench.torch_ref import torch_available

    if args.quickstart or args.config is not None:
        return bench_e2e(args)
    if args.quick:
        spec = BenchSpec(
            model="tiny",
            batch_size=4,
            seq_len=16,
            local_steps=2,
            clients=2,
            repeats=2,
            dtype=args.dtype,
        )
    else:
        spec = BenchSpec(
            model=args.model,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            local_steps=args.local_steps,
            clients=args.clients,
            repeats=args.repeats,
            round_batch_size=args.round_batch_size,
            round_seq_len=args.round_seq_len,
            clients_per_chunk=args.clients_per_chunk,
            dtype=args.dtype,
            cpu_library_fusion=args.cpu_library_fusion,
        )
    fusion_ab = [x.strip() for x in args.fusion_ab.split(",")] if args.fusion_ab else None
    for setting in fusion_ab or []:
        if setting not in CPU_LIBRARY_FUSIONS:
            raise ConfigError(
                f"bench --fusion-ab: {setting!r} is not one of {CPU_LIBRARY_FUSIONS}."
            )
    if args.allocator_ab:
        require_tcmalloc()
    if args.reference == "torch" and not torch_available():
        raise ConfigError(
            "bench --reference torch needs torch, peft and opacus: "
            'pip install -e ".[torch]" (or use --reference none).'
        )
    reference = args.reference == "torch" or (args.reference == "auto" and torch_available())
    memory = memory_settings(args.memory, args.chunks) if args.memory else None
    report = run_bench(
        spec,
        reference=reference,
        threads=args.threads,
        memory=memory,
        memory_budget_mb=(
            MEMORY_BUDGET_MB if args.memory_budget_mb is None else args.memory_budget_mb
        ),
        fusion_ab=fusion_ab,
        allocator_ab=args.allocator_ab,
        peak=args.peak_tflops,
    )
    report["command"] = "ffa-jax " + " ".join(args.argv)
    report["commit"] = _git_commit()
    write_report(report, args.out)
    print(to_markdown(report))
    return 0


def bench_e2e(args) -> int:
    """``ffa-jax bench --quickstart`` / ``--config X``: whole runs of a config in ffa_jax and
    in the torch reference, alternately (:mod:`ffa_jax.bench.e2e`)."""
    from ffa_jax.bench import e2e
    from ffa_jax.bench.torch_ref import torch_available

    if args.reference == "torch" and not torch_available():
        raise ConfigError(
            "bench --reference torch needs torch, peft and opacus: "
            'pip install -e ".[torch]" (or use --reference none).'
        )
    config = args.config
    if config is None:
        config = default_config_path()
    spec = e2e.E2ESpec(
        config=None if config is None else str(config),
        overrides=tuple(args.overrides),
        pairs=args.pairs,
        reference=args.reference == "torch" or (args.reference == "auto" and torch_available()),
        threads=args.threads or 0,
        allocator=args.allocator,
    )
    provenance = {"command": "ffa-jax " + " ".join(args.argv), "commit": _git_commit()}

    def save(report):  # after every run too: a long bench keeps what it measured so far
        e2e.write_report({**report, **provenance}, args.out)

    report = e2e.run_e2e(
        spec, workdir=args.workdir, log=lambda m: print(m, file=sys.stderr), on_run=save
    )
    report.update(provenance)
    save(report)
    print(e2e.to_markdown(report))
    return 0 if not report["failed_runs"] else 1


def memory_settings(clients: str, chunks: str) -> list[tuple[int, int]]:
    """``(K, k)`` pairs of ``bench --memory K1,K2 --chunks k1,k2``: every K with every chunk
    size k, where ``K`` in ``chunks`` means all K clients at once and k is capped at K."""

    def positive(text: str, flag: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"bench {flag}: {text!r} is not a positive integer.")
        return value

    ks = {positive(x, "--memory") for x in clients.split(",")}
    cs = [x.strip() for x in chunks.split(",")]
    sizes = {None if c.upper() == "K" else positive(c, "--chunks") for c in cs}
    return sorted({(k, k if c is None else min(c, k)) for k in ks for c in sizes})


def _git_commit() -> str:
    """The short commit of ffa_jax's checkout, ``-dirty`` with uncommitted tracked changes."""
    sha, dirty = git_state(Path(__file__).resolve().parent, short=True, untracked=False)
    return "unknown" if sha is None else sha + ("-dirty" if dirty else "")


def _worker_slot(text: str | None) -> tuple[int, int] | None:
    """``--worker K/N`` (set by ``--workers`` for its processes) -> ``(K, N)``."""
    if text is None:
        return None
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise ConfigError(f"--worker={text!r}: expected K/N with 0 <= K < N (set by --workers).")
    return int(k), int(n)


def cmd_experiment(args) -> int:
    from ffa_jax.experiments.runner import regenerate_table, run_experiment

    names = list(args.name)
    if len(names) > 1 and args.out is not None:
        raise ConfigError(
            f"--out={str(args.out)!r} names one results folder, but {len(names)} grids were "
            "given; drop --out (each grid writes experiments/results/NAME) or run one grid."
        )
    for name in names:
        if args.table:
            path = regenerate_table(name, quick=args.quick, out=args.out)
            print(f"wrote {path}")
            continue
        # The command that reruns this grid alone (the other names left out).
        rest = [a for a in args.argv[1:] if a not in names]
        command = " ".join(["ffa-jax experiment", shlex.quote(name), *map(shlex.quote, rest)])
        res = run_experiment(
            name,
            quick=args.quick,
            seeds=args.seeds,
            out=args.out,
            overrides=args.overrides,
            scratch=args.scratch,
            command=args.command or command.strip(),
            dry_run=args.dry_run,
            tune_only=args.tune_only,
            reuse=not args.no_reuse,
            workers=args.workers,
            worker=_worker_slot(args.worker),
        )
        if args.json:
            _emit(args, res)
        else:
            print(json.dumps(res, indent=2))
    return 0


# ``ffa-jax audit``: the lower bound exceeds the claimed epsilon (a privacy bug).
EXIT_PRIVACY_VIOLATION = 3


def cmd_audit(args) -> int:
    from ffa_jax.fileio import atomic_write_text
    from ffa_jax.run import run_dir
    from ffa_jax.run.audit import audit_run, check_audit_args, check_audit_config

    # Every input is checked before the (minutes of) training compute.
    check_audit_args(args.canaries, args.guesses, args.confidence)
    cfg = _load(args)
    check_audit_config(cfg)
    out = args.out or run_dir(cfg).with_name(f"{cfg.name}.audit")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; pass a folder for audit.json.")
    res = audit_run(
        cfg,
        canaries=args.canaries,
        guesses=args.guesses,
        confidence=args.confidence,
        client=args.client,
        progress=not args.no_progress and not args.json,
        log=print,  # on stderr under --json
    )
    record = {**res.to_json(), "command": "ffa-jax " + " ".join(args.argv), "config": cfg.to_dict()}
    atomic_write_text(out / "audit.json", json.dumps(record, indent=2) + "\n")
    if args.json:
        _emit(args, record)
    else:
        print(res.summary())
        print(f"written: {out / 'audit.json'}")
    return EXIT_PRIVACY_VIOLATION if res.violation else 0


def cmd_config(args) -> int:
    if args.schema:
        if args.config is not None or args.overrides:
            raise ConfigError("--schema describes every config; drop --config and --set.")
        from ffa_jax.config_doc import schema

        if args.json:
            _emit(args, schema())
        else:
            print(json.dumps(schema(), indent=2))
        return 0
    cfg = _load(args)
    if args.json:
        _emit(args, cfg.to_dict())
    else:
        print(cfg.to_yaml(), end="")
    return 0


def cmd_export_peft(args) -> int:
    import warnings

    from ffa_jax.run.inference import export_run_peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caveats are printed below
        res = export_run_peft(
            args.run_dir,
            args.out_dir,
            base_model=args.base_model,
            absolute_base_path=args.absolute_base_path,
            merged=not args.no_merged,
            overwrite=args.overwrite,
            vit_layout=args.vit_layout,
        )
    for w in res.warnings:
        print(f"ffa-jax: warning: {w}", file=sys.stderr)
    if args.json:
        _emit(args, dataclasses.asdict(res))  # paths as strings
        return 0
    labels = "" if res.num_labels is None else f", num_labels={res.num_labels}"
    print(f"PEFT adapter: {res.out_dir} ({res.family}, base model {res.base_model}{labels})")
    if res.merged_dir is not None:
        print(f"merged HF checkpoint: {res.merged_dir}")
    return 0


def _write_jsonl(rows, output: Path | None) -> None:
    """One JSON object per line to ``output`` (atomically) or stdout."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)
        print(f"written: {output} ({len(rows)} lines)", file=sys.stderr)


def cmd_generate(args) -> int:
    from ffa_jax.run import inference

    cfg, family = inference.read_run_config(args.run_dir)
    if (args.prompt is None) == (args.input is None):
        raise ConfigError(
            "give the prompts with either --prompt TEXT (repeatable) or --input FILE."
        )
    # Checked before the model is loaded: the run's kind, then the input file.
    inference.check_family(args.run_dir, family, inference.DECODER_FAMILIES, "generate")
    prompts = args.prompt or inference.read_inputs(cfg, family, args.input)
    run = inference.load_run(args.run_dir, families=inference.DECODER_FAMILIES, purpose="generate")
    rows = inference.generate(
        run,
        prompts,
        max_new_tokens=args.max_new_tokens,
        fmt=args.format,
        batch_size=args.batch_size,
    )
    _write_jsonl(rows, args.output)
    return 0


def cmd_predict(args) -> int:
    from ffa_jax.run import inference

    cfg, family = inference.read_run_config(args.run_dir)
    inference.check_family(args.run_dir, family, inference.CLASSIFIER_FAMILIES, "predict")
    inputs = inference.read_inputs(cfg, family, args.input)
    run = inference.load_run(
        args.run_dir, families=inference.CLASSIFIER_FAMILIES, purpose="predict"
    )
    rows = inference.predict(run, inputs, batch_size=args.batch_size)
    _write_jsonl(rows, args.output)
    return 0


def cmd_eval(args) -> int:
    from ffa_jax.run import inference

    run = inference.load_run(args.run_dir)
    metrics = inference.evaluate(run, args.split)
    samples = metrics.pop("eval_samples", None)
    recorded = run.recorded_eval()
    if args.json:
        _emit(args, {"split": args.split, "metrics": metrics, "recorded": recorded})
        return 0
    print(f"{run.run_dir} ({run.family}, {args.split} split):")
    for k, v in metrics.items():
        was = ""
        if recorded and k in recorded:
            # Lists (per-class recall) print as they are.
            r = recorded[k]
            r = f"{r:.6g}" if isinstance(r, float) else r
            was = f"  (recorded after round {recorded['round']}: {r})"
        print(f"  {k} = {v:.6g}{was}" if isinstance(v, float) else f"  {k} = {v}{was}")
    for s in samples or []:
        print(f"  sample: {json.dumps(s)}")
    return 0


def _absolute_output(cfg):
    """The config with an absolute ``output_dir`` (the ServerApp runs in another folder)."""
    from ffa_jax.config import replace

    return replace(cfg, [f"output_dir={Path(cfg.output_dir).absolute()}"])


def cmd_flower_app(args) -> int:
    from ffa_jax.flower.app import write_app

    cfg = _absolute_output(_load(args))
    out = write_app(
        cfg,
        args.out_dir,
        round_timeout=args.round_timeout,
        node_timeout=args.node_timeout,
        overwrite=args.overwrite,
    )
    k = cfg.federated.clients
    print(f"Flower App: {out / 'pyproject.toml'} (run {cfg.name}, {k} clients)")
    print(f"run it: flwr run {out} <superlink-connection>   # with {k} SuperNodes connected")
    return 0


def cmd_flower_local(args) -> int:
    from ffa_jax.flower.app import write_app
    from ffa_jax.flower.local import LocalFederation
    from ffa_jax.run import run_dir

    cfg = _absolute_output(_load(args))
    out = run_dir(cfg)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other; pass one of them.")
    if args.resume and not (out / "config.yaml").is_file():
        raise ConfigError(
            f"--resume: {str(out)!r} is not a run directory (no config.yaml); start the run "
            "without --resume (same --config/--set as the stopped run)."
        )
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise ConfigError(
            f"run directory {str(out)!r} already exists; pass --resume to continue it from its "
            "last checkpoint, --overwrite to replace it, or choose another name with "
            "--set name=<new-name>."
        )
    # The same work folder as the stopped run: the nodes' state-dirs (secrets, rounds trained,
    # kept replies) live there.
    work = args.work_dir or out.parent / f"{cfg.name}.flower"
    app_dir = write_app(
        cfg,
        Path(work) / "app",
        round_timeout=args.timeout,
        node_timeout=min(args.timeout, 300.0),
        overwrite=args.overwrite,
        resume=args.resume,
    )
    with LocalFederation(work, cfg.federated.clients) as fed:
        print(
            f"SuperLink on 127.0.0.1:{fed.superlink_port}, {cfg.federated.clients} SuperNodes "
            f"(ports {fed.node_ports}); logs in {fed.log_dir}",
            flush=True,
        )
        run_id = fed.submit(app_dir)
        print(f"flwr run: run {run_id}", flush=True)
        stream = fed.stream_logs(run_id)
        status = fed.wait(run_id, timeout=args.timeout)
        try:  # let the log stream print the run's last lines
            stream.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    if status != "finished:completed":
        raise FederationError(f"run {run_id} ended {status}; see the log above and {work}/logs/.")
    print(f"run directory: {out}")
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends ``(default: X)`` to an option's help when
    it has a meaningful default (not None/False/empty) that the help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (
            "default" in text
            or d in (None, False, "", [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {d})"


# Examples shown by `ffa-jax COMMAND --help` (the configs are those shipped in configs/).
EXAMPLES = {
    "train": [
        "ffa-jax train                                     # the quickstart: FFA-LoRA, epsilon 6",
        "ffa-jax train --config glue/sst2 --set privacy.epsilon=3",
        "ffa-jax train --set lora.mode=lora --set name=lora --json > summary.json",
        "ffa-jax train --resume runs/quickstart --set federated.rounds=30",
    ],
    "pretrain": [
        "ffa-jax pretrain                                  # configs/vision_pretrain_mnist.yaml",
        "ffa-jax pretrain --set optim.epochs=2 --set name=vit_small",
    ],
    "privacy": [
        "ffa-jax privacy --set privacy.epsilon=3",
        "ffa-jax privacy --config glue/sst2 --json --png eps.png",
    ],
    "bench": ["ffa-jax bench --quick", "ffa-jax bench --model minilm --memory 8,32 --chunks 1,K"],
    "experiment": [
        "ffa-jax experiment rank_sweep --quick --dry-run",
        "ffa-jax experiment privacy_evidence heterogeneity_evidence vision_evidence",
    ],
    "audit": ["ffa-jax audit --set federated.rounds=2 --canaries 200 --json"],
    "config": [
        "ffa-jax config --config glue/sst2 --set lora.rank=4",
        "ffa-jax config --schema | jq '.train.fields[\"lora.mode\"]'",
    ],
    "export-peft": [
        "ffa-jax export-peft runs/quickstart peft/quickstart --base-model "
        "sentence-transformers/all-MiniLM-L6-v2"
    ],
    "generate": ['ffa-jax generate runs/gsm_smollm2 --prompt "What is 12 * 7?"'],
    "predict": ["ffa-jax predict runs/quickstart --input texts.jsonl --output preds.jsonl"],
    "eval": ["ffa-jax eval runs/quickstart --json"],
    "flower": ["ffa-jax flower local --set federated.rounds=2", "ffa-jax flower app app/"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ffa-jax", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ffa-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)

    class Sub:
        """``add_parser`` with the help as description and the command's examples."""

        def __init__(self, actions):
            self.actions = actions

        def add_parser(self, name: str, *, help: str, **kw) -> argparse.ArgumentParser:
            examples = EXAMPLES.get(name)
            if name == "config":
                from ffa_jax.config import shipped_configs

                extra = "shipped configs (--config NAME): " + ", ".join(shipped_configs())
            else:
                extra = ""
            epilog = "\n".join(
                (["examples:", *(f"  {e}" for e in examples)] if examples else []) + [extra]
            ).strip()
            return self.actions.add_parser(
                name,
                help=help,
                description=help[0].upper() + help[1:] + ".",
                epilog=epilog or None,
                formatter_class=HelpFormatter,
                **kw,
            )

    sub = Sub(subparsers)

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
    _add_json_arg(p, "the final summary")
    g = p.add_argument_group("multi-host (one process per host; see docs/accelerators.md)")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join the other processes with jax.distributed.initialize (auto-detected on Cloud "
        "TPU VMs, SLURM and Open MPI; elsewhere pass the three flags below)",
    )
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=int, default=None, metavar="N")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="0..N-1")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "pretrain", help="train a small ViT centrally (non-private) on a public image task"
    )
    _add_config_args(
        p,
        "the built-in defaults, which are configs/vision_pretrain_mnist.yaml's",
        "--set optim.epochs=2 --set model.num_layers=2",
    )
    p.set_defaults(config=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_json_arg(p, "the final summary")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("privacy", help="plan the privacy budget of a config without training")
    _add_config_args(p)
    _add_json_arg(p, "the plan and its alternatives (instead of tables)")
    p.add_argument("--png", type=Path, default=None, help="also plot epsilon vs round to this PNG")
    p.set_defaults(func=cmd_privacy)

    p = sub.add_parser(
        "plan",
        help="estimate a config's per-device memory (XLA, abstract shapes) and whether it fits",
    )
    _add_config_args(p)
    p.add_argument(
        "--device-memory", default="32GiB", help="memory of one device, e.g. 32GiB, 16GB, 80GiB"
    )
    p.add_argument("--devices", type=int, default=1, help="devices of the host the run will use")
    p.add_argument(
        "--backend",
        choices=["gpu", "tpu", "cpu"],
        default="gpu",
        help="the backend perf 'auto' values resolve for (default gpu; tpu resolves alike)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="compile at the model's full depth instead of extrapolating 1- and 2-layer compiles",
    )
    _add_json_arg(p, "the plan")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="time DP vs non-DP, FFA vs LoRA client updates and a round")
    p.add_argument(
        "--model",
        choices=["tiny", "minilm", "roberta-base"],
        default="minilm",
        help="the timed encoder",
    )
    p.add_argument("--batch-size", type=int, default=32, help="examples per client step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example")
    p.add_argument("--local-steps", type=int, default=2, help="client steps per update")
    p.add_argument("--clients", type=int, default=3, help="clients of the timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--round-batch-size", type=int, default=0, help="per-client batch of the round")
    p.add_argument("--round-seq-len", type=int, default=0, help="sequence length of the round")
    p.add_argument("--clients-per-chunk", type=int, default=0, help="of the round (0 = all)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="model.dtype of the timed encoder (LoRA factors, gradients and noise stay float32)",
    )
    p.add_argument(
        "--reference",
        choices=["auto", "torch", "none"],
        default="auto",
        help="PyTorch Opacus+PEFT reference in the same run (auto: when torch is installed)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak in TFLOP/s for the MFU column (default: the known peak "
        "of an H100/H200/A100/TPU v4/v5e for --dtype; none on a CPU)",
    )
    p.add_argument(
        "--memory",
        default="",
        help="comma-separated K values: round memory for every chunk size of --chunks, "
        "one subprocess each",
    )
    p.add_argument(
        "--chunks",
        default="1,K",
        help="comma-separated chunk sizes k of the --memory rounds; K = all clients at once",
    )
    p.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="--memory rounds whose XLA buffers exceed this many MB (2^20 bytes) are compiled, "
        "not run (default 6144; 0 = run all)",
    )
    p.add_argument(
        "--cpu-library-fusion",
        choices=list(CPU_LIBRARY_FUSIONS),
        default="auto",
        help="perf.cpu_library_fusion of the timed jits (XLA:CPU matmul kernels; auto = the "
        "encoder's best, off)",
    )
    p.add_argument(
        "--fusion-ab",
        default="",
        help="comma-separated perf.cpu_library_fusion settings (e.g. jax,dots,off) whose FFA DP "
        "client updates are timed against each other in this process",
    )
    p.add_argument(
        "--allocator-ab",
        action="store_true",
        help="also time the FFA DP client update on the system malloc against tcmalloc, one "
        "worker process each, alternately (needs tcmalloc; see FFA_JAX_ALLOCATOR)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, small batch, 2 repeats (CI)")
    p.add_argument(
        "--quickstart",
        action="store_true",
        help="whole runs of the quickstart config: ffa-jax train vs the torch reference, "
        "alternately, each a fresh subprocess (wall, per-round time, peak RSS, accuracy)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="like --quickstart, for this run config",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="with --quickstart / --config: a config override for both sides (repeatable)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=2,
        help="with --quickstart / --config: (ffa_jax, reference) pairs",
    )
    p.add_argument(
        "--allocator",
        choices=["auto", "tcmalloc", "system"],
        default="auto",
        help="with --quickstart / --config: FFA_JAX_ALLOCATOR of both sides",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="with --quickstart / --config: run directories and logs (default: a temp folder)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("experiments/results/bench"),
        help="folder for the report (JSON + Markdown)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "experiment",
        help="run an experiment grid (experiments/grids/NAME.yaml), resuming finished cells",
    )
    p.add_argument(
        "name",
        nargs="+",
        help="grid name (experiments/grids/NAME.yaml) or a grid YAML path; several run one "
        "after the other (each resumes its finished cells)",
    )
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
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N cells at once, each worker process pinned to an equal share of the CPUs "
        "(a small model's step does not keep several XLA threads busy: see docs/experiments.md);"
        " the cells record their CPUs, and their command starts with the taskset that "
        "reproduces them; default 1",
    )
    # Set by --workers for its worker processes.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-reuse",
        action="store_true",
        help="run every cell, even one whose resolved config equals a finished cell of another "
        "results folder beside it (by default that run's record is copied, naming its source)",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="rewrite table.md from the results folder's runs.csv and meta.json; run nothing",
    )
    _add_json_arg(p, "the grid's result")
    p.set_defaults(func=cmd_experiment, argv=None)

    p = sub.add_parser(
        "audit",
        help="train the run with canaries and bound its epsilon from below (exit 3: violation)",
    )
    _add_config_args(p)
    p.add_argument("--canaries", type=int, default=1000, help="m canaries (default 1000)")
    p.add_argument(
        "--guesses",
        type=int,
        default=None,
        help="r < m guesses, half 'in' and half 'out' (default min(100, m - 1))",
    )
    p.add_argument(
        "--confidence", type=float, default=0.95, help="of the lower bound (default 0.95)"
    )
    p.add_argument(
        "--client",
        type=int,
        default=None,
        help="the audited client (sample-level; default: the one with the largest epsilon)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for audit.json (default <output_dir>/<name>.audit)",
    )
    _add_json_arg(p, "the result (as written to audit.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("config", help="print the resolved and validated config")
    _add_config_args(p)
    _add_json_arg(p, "the config (instead of YAML)")
    p.add_argument(
        "--schema",
        action="store_true",
        help="print every config field instead (JSON: type, default, choices, help; the run "
        "config and the pretraining config)",
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "export-peft", help="write a run's adapter in HF PEFT format (+ a merged HF checkpoint)"
    )
    p.add_argument("run_dir", type=Path, help="a finished run directory, e.g. runs/quickstart")
    p.add_argument("out_dir", type=Path, help="the adapter folder to write")
    p.add_argument("--no-merged", action="store_true", help="skip the merged checkpoint (merged/)")
    p.add_argument(
        "--base-model",
        default=None,
        metavar="NAME",
        help="base_model_name_or_path to record, e.g. the hub id (default: the run's model.name "
        "if it is a hub id; a local model folder is recorded by its name only)",
    )
    p.add_argument(
        "--absolute-base-path",
        action="store_true",
        help="record the local base model's absolute path (the adapter then loads only here)",
    )
    p.add_argument(
        "--vit-layout",
        choices=("auto", "v4", "v5"),
        default="auto",
        help="ViT module names: v4 (vit.encoder.layer.N.attention.attention.query, transformers "
        "4), v5 (vit.layers.N.attention.q_proj, transformers 5); auto: the installed one's",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    _add_json_arg(p, "the written folders, family and warnings")
    p.set_defaults(func=cmd_export_peft)

    p = sub.add_parser("generate", help="greedy generation from a decoder run's adapter")
    p.add_argument("run_dir", type=Path, help="a finished decoder run directory")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument(
        "--input", type=Path, default=None, help='JSON lines with "prompt" (or "question"/"text")'
    )
    p.add_argument(
        "--format",
        choices=("task", "chat", "raw"),
        default="task",
        help="task: the run's chat template + task instruction, as in training (default); "
        "chat: the chat template only; raw: the text as given",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    p.add_argument("--output", type=Path, default=None, help="JSON lines file (default: stdout)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("predict", help="class predictions of a classifier run's adapter")
    p.add_argument("run_dir", type=Path, help="a finished classifier run directory")
    p.add_argument(
        "--input",
        type=Path,
        required=True,
        help='text runs: JSON lines with "text"; image runs: .npy [N, H, W(, C)] or .npz '
        "with 'images'",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    p.add_argument("--output", type=Path, default=None, help="JSON lines file (default: stdout)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="re-evaluate a run's adapter with the run's metrics")
    p.add_argument("run_dir", type=Path, help="a finished run directory")
    p.add_argument("--split", default="test", help="the split to evaluate (test)")
    _add_json_arg(p, "the metrics and the recorded ones")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "flower", help="run on Flower's deployment runtime (needs pip install 'ffa_jax[flower]')"
    )
    fsub = Sub(p.add_subparsers(dest="flower_command", required=True))
    q = fsub.add_parser("app", help="write a Flower App folder (pyproject.toml) for a run config")
    q.add_argument("out_dir", type=Path, help="the folder to write (flwr run OUT_DIR ...)")
    _add_config_args(q)
    q.add_argument(
        "--round-timeout",
        type=float,
        default=1800.0,
        help="seconds the server waits for the clients of one round (default 1800)",
    )
    q.add_argument(
        "--node-timeout",
        type=float,
        default=300.0,
        help="seconds the server waits for all SuperNodes to connect (default 300)",
    )
    q.add_argument(
        "--overwrite", action="store_true", help="the server replaces an existing run directory"
    )
    q.set_defaults(func=cmd_flower_app)
    q = fsub.add_parser(
        "local",
        help="SuperLink + one SuperNode per client on 127.0.0.1, flwr run, wait, shut down",
    )
    _add_config_args(q)
    q.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="Flower home, app, logs, compilation cache (default <output_dir>/<name>.flower)",
    )
    q.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds the run may take (default 3600)"
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped run (same --config/--set/--work-dir) from its last checkpoint",
    )
    q.set_defaults(func=cmd_flower_local)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.stdout = sys.stdout
    try:
        if getattr(args, "json", False):
            # Machine-readable stdout: only the command's JSON line (see _emit); every log
            # line, table and warning printed on the way goes to stderr.
            with contextlib.redirect_stdout(sys.stderr):
                return args.func(args)
        return args.func(args)
    except FfaJaxError as e:
        print(f"ffa-jax: error: {e}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``ffa-jax`` command: first moves the process onto tcmalloc when the machine has it
    (:mod:`ffa_jax.allocator`; a re-exec, so only here, never in :func:`main`), then runs it."""
    from ffa_jax import allocator

    try:
        allocator.reexec_with_tcmalloc()
    except FfaJaxError as e:
        print(f"ffa-jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())


if __name__ == "__main__":
    console_main()
