"""``ffa-jax experiment NAME``: expand a grid into cells, run the missing ones, write results.

Every finished cell is stored as ``OUT/cells/<cell>.json`` (its overrides, the command that
reruns it alone, the ffa_jax version and git commit that produced it, its summary and per-round
history). A cell whose file exists is never run again, so an interrupted experiment resumes
where it stopped and a finished one reruns nothing. After every cell ``runs.csv``,
``table.md`` and the plots are rewritten from all cell files.

A train cell whose resolved run config (its :func:`run_fingerprint`) equals that of a finished
cell of another results folder beside ``OUT`` (another grid) is not run again: that cell's
record is copied, with its own commit and run time, under this grid's cell name, command and
axes, and ``reused_from`` names the file it came from (``reuse=False`` / ``--no-reuse`` runs
it). The evidence grids share such runs: the label-mix, epsilon-4, alpha-8, rank-8 tuning
cells of ``heterogeneity_evidence``, ``alpha_evidence`` and ``rank_evidence`` are one run each.

Learning-rate tuning (a grid's ``tune:``) is part of the experiment: its cells run first on
their own seeds and read the validation split only, the best candidate of each group (highest
mean validation score over the tuning seeds, see :mod:`ffa_jax.experiments.grid`; a diverged
run counts as 0) is chosen, and the reported (``main``) cells use it. A grid's ``pretrain:``
backbone is trained before the first cell when its folder is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ffa_jax import xla_options
from ffa_jax.errors import ConfigError, DataError
from ffa_jax.experiments import evidence as evidence_lib
from ffa_jax.experiments import grid as grid_lib
from ffa_jax.experiments import results as results_lib
from ffa_jax.experiments import workers as workers_lib
from ffa_jax.fileio import atomic_write_text
from ffa_jax.run import NonFiniteError, train
from ffa_jax.run.report import metric_value
from ffa_jax.version import REPO_ROOT, __version__, git_state

RESULTS_DIR = Path("experiments/results")
SCRATCH_DIR = Path("runs/experiments")
# How often a worker waiting for the other workers' tuning cells looks again (seconds).
WORKER_POLL_SECONDS = 10.0


def git_commit(root: Path | None = None, grid_file: Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool}`` of the repository holding ffa_jax; dirty
    means uncommitted changes to ffa_jax/, configs/ or the grid file itself. A grid file
    outside the repository is not version-controlled: the commit is still that of the code
    (each cell's command names every setting), and ``grid_file_in_repo`` says so."""
    root = Path(root or REPO_ROOT).resolve()
    paths = ["ffa_jax", "configs"]
    inside = True
    if grid_file is not None:
        grid_path = Path(grid_file).resolve()
        inside = grid_path.is_relative_to(root)
        if inside:
            # (git status with a path outside the work tree fails as a whole.)
            paths.append(str(grid_path))
    sha, dirty = git_state(root, paths=paths)
    return {"commit": sha, "dirty": dirty, **({} if inside else {"grid_file_in_repo": False})}


def full_model_bytes(cfg) -> int:
    """Bytes of every parameter of ``cfg``'s model with its head (what full fine-tuning would
    upload per client per round, float32)."""
    import jax

    from ffa_jax import lora
    from ffa_jax.data.clients import load_clients
    from ffa_jax.models import sources
    from ffa_jax.models import weights as weights_lib

    data, _ = load_clients(cfg)
    _, params = weights_lib.load_encoder(
        str(sources.resolve_model_dir(cfg.model.name)),
        data.num_labels,
        head_key=jax.random.key(0),
        pooling=cfg.model.pooling,
    )
    return lora.tree_bytes(params)


def cell_command(grid: grid_lib.Grid, cell: grid_lib.Cell, extra: Sequence[str], where) -> str:
    """The command that reruns one cell alone and reproduces its numbers (same machine)."""
    if grid.kind != "train":
        quick = " --quick" if grid.quick else ""
        return f"ffa-jax experiment {grid.path}{quick}  # cell {cell.cell_id}"
    parts = ["ffa-jax", "train", "--no-progress", "--overwrite"]
    if grid.base is not None:
        parts += ["--config", str(grid.base)]
    for o in [*cell.overrides, *extra, *where]:
        parts += ["--set", o]
    return shlex.join(parts)


def run_fingerprint(cfg, cpu_threads: int) -> str:
    """The identity of a train cell's numbers: the SHA-1 (hex) of its resolved, validated
    :class:`ffa_jax.config.RunConfig` without ``name`` and ``output_dir`` (where it is written,
    nothing it computes), and of ``cpu_threads``, the CPUs it ran on (XLA:CPU's thread count
    sets the float summation order of its matmuls). Cells of any grids with one fingerprint
    train on the same data, split, seeds and (research grids set ``privacy.noise_seed``) noise
    with the same threads, so on one machine and one training program they give the same
    numbers."""
    d = cfg.to_dict()
    d.pop("name", None)
    d.pop("output_dir", None)
    d["cpu_threads"] = int(cpu_threads)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def finished_runs(results_root: Path, *, exclude: Path) -> dict[str, Path]:
    """``{fingerprint: cell file}`` of the finished train cells in the results folders under
    ``results_root`` other than ``exclude`` (first file in name order wins).

    Only records that store their fingerprint (written since the runner stores it) are
    indexed: an older record's config cannot be re-resolved safely (its base config and the
    defaults may have changed since), and a run is reused only as far as resuming trusts the
    grid's own cells.
    """
    index: dict[str, Path] = {}
    if not results_root.is_dir():
        return index
    skip = exclude.resolve()
    for folder in sorted(p for p in results_root.iterdir() if (p / "cells").is_dir()):
        if folder.resolve() == skip:
            continue
        for path in sorted((folder / "cells").glob("*.json")):
            try:
                fp = json.loads(path.read_text()).get("fingerprint")
            except (OSError, ValueError):
                continue
            if isinstance(fp, str) and fp:
                index.setdefault(fp, path)
    return index


# What names a record's place in its grid (rewritten when a run is reused by another grid).
_PLACE = ("cell_id", "file_stem", "stage", "seed", "axes", "tuned", "overrides", "command")


def _history(run_dir: Path) -> list[dict[str, Any]]:
    keep = (
        "round",
        "train_loss",
        "eval_accuracy",
        "epsilon",
        "uplink_bytes",
        "update_norm",
        *(f"{split}_{m}" for split in ("val", "eval") for m in evidence_lib.METRICS),
    )
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: metric_value(rec, k) for k in keep if metric_value(rec, k) is not None})
    return out


def run_cell(grid, cell, extra, scratch: Path, log) -> dict[str, Any]:
    """Runs one cell; returns its record (never raises for a diverged run or bad data)."""
    from ffa_jax.experiments import probes

    where = [f"output_dir={scratch}", f"name={cell.file_stem}"]
    cfg = grid_lib.cell_config(grid, cell, [*extra, *where])
    quiet = lambda *a, **k: None  # noqa: E731
    t0 = time.time()
    rec: dict[str, Any] = {"status": "ok"}
    try:
        if grid.kind == "train":
            summary = train(cfg, overwrite=True, progress=False, log=quiet)
            rec.update(summary)
            rec["history"] = _history(Path(summary["run_dir"]))
            rec["final_train_loss"] = rec["history"][-1].get("train_loss")
        elif grid.kind == "noise_amplification":
            rec.update(probes.noise_amplification(cfg, log=quiet))
        else:
            ref = float(grid.probe.get("reference_alpha", 8))
            rec.update(probes.theorem1(cfg, reference_alpha=ref, log=quiet))
    except NonFiniteError as e:
        rec.update(status="diverged", message=str(e).split(". ")[0])
        # The validation-selected round before the divergence and its test metrics: a
        # diverged run is reported by its early-stopped model, like every other run.
        rec.update(e.selected)
        run_dir = Path(cfg.output_dir) / cfg.name
        if grid.kind == "train" and (run_dir / "metrics.jsonl").is_file():
            rec["history"] = _history(run_dir)
    except (DataError, ConfigError) as e:
        # Every cell's config validated before the run; what fails here depends on the data
        # (e.g. a Dirichlet client smaller than the batch): recorded, the grid goes on.
        rec.update(status="error", message=str(e))
    rec["wall_seconds"] = time.time() - t0
    rec.pop("run_dir", None)
    return rec


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    out: Path | None = None,
    overrides: Sequence[str] = (),
    scratch: Path | None = None,
    command: str | None = None,
    dry_run: bool = False,
    tune_only: bool = False,
    reuse: bool = True,
    workers: int = 1,
    worker: tuple[int, int] | None = None,
    log=print,
) -> dict[str, Any]:
    """Runs the grid ``name`` (``experiments/grids/NAME.yaml`` or a path) and writes ``out``.

    Args:
      quick: the grid's ``quick:`` size (CI).
      seeds: replace the grid's reported seeds.
      out: results folder (default ``experiments/results/NAME`` or ``.../NAME-quick``).
      overrides: ``section.field=value`` applied to every cell (recorded; an ``out`` folder
        holding cells made with other overrides or another size is refused).
      scratch: where the cells' run directories go (default ``runs/experiments/<out name>``).
      dry_run: list the cells and what would run, run nothing.
      tune_only: run the tuning cells and stop (the choice is then in ``table.md``).
      reuse: copy a train cell whose :func:`run_fingerprint` matches a finished cell of
        another results folder beside ``out`` instead of running it (module docstring).
      workers: run the cells in this many processes at once, each pinned to an equal share
        of this process's CPUs (:mod:`ffa_jax.experiments.workers`); 1 runs them here.
      worker: ``(k, n)``: this process is worker k of n (set by ``workers``; it claims each
        cell before running it and waits for the other workers' tuning cells).

    Returns:
      ``{"out": path, "ran": n, "reused": n, "skipped": n, "cells": n, "seconds": wall}``.

    Raises:
      ConfigError: bad grid, bad override, bad ``workers``, or ``out`` made with other
        settings.
      RuntimeError: a worker process failed (its output says why).
    """
    t0 = time.time()
    grid = grid_lib.load_grid(grid_lib.find_grid(name), quick=quick, seeds=seeds)
    for o in overrides:
        grid_lib.parse_override(o)
    cpu_sets = workers_lib.split_cpus(workers) if worker is None else None
    out = Path(out) if out is not None else RESULTS_DIR / (grid.name + ("-quick" if quick else ""))
    scratch = Path(scratch) if scratch is not None else SCRATCH_DIR / out.name
    cells_dir = out / "cells"
    settings = {"grid": grid.name, "quick": quick, "set": list(overrides)}
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta and {k: meta.get(k) for k in settings} != settings:
        raise ConfigError(
            f"{str(out)!r} holds results of {json.dumps({k: meta.get(k) for k in settings})}, "
            f"not {json.dumps(settings)}: pass another --out, or delete the folder to start over."
        )
    tune_cells = grid_lib.tune_cells(grid)
    if dry_run:
        main = grid_lib.main_cells(grid, None) if grid.tune is None else []
        todo = [c for c in tune_cells + main if not (cells_dir / f"{c.file_stem}.json").is_file()]
        for c in tune_cells + main:
            log(f"{'todo' if c in todo else 'done'}  {c.cell_id}")
        if grid.tune is not None:
            log(f"+ {len(grid_lib.main_cells(grid, None))} main cells after tuning")
        if grid.pretrain is not None:
            folder = grid_lib.pretrain_folder(grid.pretrain)
            state = "exists" if folder.is_dir() else "is trained first"
            log(f"backbone {folder} (ffa-jax pretrain --config {grid.pretrain}) {state}")
        return {"out": str(out), "ran": 0, "skipped": 0, "cells": len(tune_cells)}

    # The code that runs is the code imported now: record its commit once, not per cell.
    code = git_commit(grid_file=grid.path)
    command = command or f"ffa-jax experiment {name}" + (" --quick" if quick else "")
    info = {
        **settings,
        "description": grid.description,
        "grid_file": str(grid.path),
        "command": command,
        "ffa_jax_version": __version__,
        **code,
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "jax_devices": None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    import jax

    info["jax_devices"] = f"{len(jax.devices())} x {jax.devices()[0].platform}"
    if grid.probe.get("target_accuracy") is not None:
        info["full_model_bytes"] = full_model_bytes(
            grid_lib.cell_config(grid, grid_lib.main_cells(grid, None)[0], overrides)
        )
    # One persistent compilation cache for the whole grid: cells that differ only in runtime
    # values (seed, epsilon, data) reuse one compiled round. A cache the user set up stands.
    if not jax.config.jax_compilation_cache_dir:
        xla_options.enable_compilation_cache(
            True, Path(os.environ.get("FFA_JAX_CACHE", "runs/.jax_cache"))
        )
    if grid.pretrain is not None:
        info["pretrain"] = _ensure_pretrained(grid.pretrain, log)
    cells_dir.mkdir(parents=True, exist_ok=True)
    if cpu_sets is not None and len(cpu_sets) > 1:
        before = {p.name for p in cells_dir.glob("*.json")}
        argvs = []
        for k in range(len(cpu_sets)):
            argv = [*workers_lib.python_argv(), "experiment", str(grid.path), "--out", str(out)]
            argv += ["--worker", f"{k}/{len(cpu_sets)}", "--scratch", str(scratch)]
            argv += ["--command", command]
            argv += ["--quick"] * quick + ["--no-reuse"] * (not reuse) + ["--tune-only"] * tune_only
            if seeds is not None:
                argv += ["--seeds", *map(str, seeds)]
            for o in overrides:
                argv += ["--set", o]
            argvs.append(argv)
        log(f"[{grid.name}] {len(cpu_sets)} workers on CPUs {cpu_sets}")
        codes = workers_lib.run_workers(argvs, cpu_sets)
        _write(grid, out, info, meta)  # once more, from every worker's cells
        after = {p.name for p in cells_dir.glob("*.json")}
        if any(codes):
            raise RuntimeError(
                f"experiment {grid.name}: worker exit codes {codes} (their output above says "
                "why); the finished cells are kept: rerun the same command to resume."
            )
        new = [json.loads((cells_dir / n).read_text()) for n in sorted(after - before)]
        n_reused = sum(1 for c in new if c.get("reused_from"))
        total = len(tune_cells)
        if grid.tune is not None:
            tune_cells, chosen = results_lib.resolve_tuning(
                grid, results_lib.load_cells(cells_dir, "tune")
            )
            total = len(tune_cells)
        else:
            chosen = None
        if not tune_only and (grid.tune is None or chosen is not None):
            total += len(grid_lib.main_cells(grid, chosen))
        return {
            "out": str(out),
            "ran": len(new) - n_reused,
            "reused": n_reused,
            "skipped": len(before),
            "cells": total,
            "seconds": time.time() - t0,
        }

    ran = skipped = reused = 0
    seconds_run = 0.0
    threads = workers_lib.cpu_threads()
    prefix = "" if worker is None else workers_lib.taskset_prefix(workers_lib.usable_cpus())
    claims = scratch / ".claims"
    # Finished runs of the other grids (read once: a grid's own new cells never match them).
    others = finished_runs(out.parent, exclude=out) if reuse and grid.kind == "train" else {}
    tag = grid.name if worker is None else f"{grid.name} worker {worker[0] + 1}/{worker[1]}"

    def run_one(cell, path: Path, i: int, n: int) -> None:
        nonlocal ran, reused, seconds_run
        log(f"[{tag}] {cell.stage} {i}/{n}: {cell.cell_id}")
        where = [f"output_dir={scratch}", f"name={cell.file_stem}"]
        fingerprint = None
        if grid.kind == "train":
            cfg = grid_lib.cell_config(grid, cell, [*overrides, *where])
            fingerprint = run_fingerprint(cfg, threads)
        source = others.get(fingerprint) if fingerprint is not None else None
        if source is not None:
            # The same run, finished by another grid: its numbers, commit, run time and
            # command prefix stand; only its place (name, axes, command) is this grid's.
            rec = json.loads(source.read_text())
            rec = {k: v for k, v in rec.items() if k not in _PLACE}
            rec["reused_from"] = source.as_posix()
            cmd_prefix = rec.get("command_prefix", "")
        else:
            rec = run_cell(grid, cell, overrides, scratch, log)
            rec.update(ffa_jax_version=__version__, cpu_threads=threads, **code)
            cmd_prefix = prefix
            if prefix:
                rec["command_prefix"] = prefix
        rec.update(
            cell_id=cell.cell_id,
            file_stem=cell.file_stem,
            stage=cell.stage,
            seed=cell.seed,
            axes={k: grid_lib.fmt_value(v) for k, v in cell.axes.items()},
            tuned=None if cell.tuned is None else [[f, v] for f, v in cell.tuned],
            overrides=list(cell.overrides) + list(overrides),
            command=cmd_prefix + cell_command(grid, cell, overrides, where),
        )
        if fingerprint is not None:
            rec["fingerprint"] = fingerprint
        atomic_write_text(path, json.dumps(_clean(rec), indent=1, default=_json_default))
        if source is not None:
            reused += 1
            log(f"  -> reused (the same run config) from {source.as_posix()}")
        else:
            ran += 1
            seconds_run += rec["wall_seconds"]
            log(f"  -> {rec['status']}{_cell_score(rec, cell.stage)} ({rec['wall_seconds']:.0f} s)")

    def run_all(cells) -> int:
        """Runs the missing ``cells``; returns how many of them this process finished."""
        nonlocal skipped
        done = 0
        for i, cell in enumerate(cells, 1):
            path = cells_dir / f"{cell.file_stem}.json"
            if path.is_file():
                skipped += 1
                continue
            if worker is None:
                run_one(cell, path, i, len(cells))
            else:
                claim = claims / f"{cell.file_stem}.claim"
                if not workers_lib.claim(claim):
                    continue  # another worker runs it
                try:
                    if path.is_file():  # finished by another worker since the check above
                        continue
                    run_one(cell, path, i, len(cells))
                finally:
                    workers_lib.release(claim)
            done += 1
            if worker is None or worker[0] == 0:
                _write(grid, out, info, meta)
        return done

    chosen = None
    if grid.tune is not None:
        # Tuning runs until no choice sits at an extendable edge of its grid (each round of
        # extensions adds cells; every finished cell is kept and never rerun).
        while True:
            tune_cells, chosen = results_lib.resolve_tuning(
                grid, results_lib.load_cells(cells_dir, "tune")
            )
            if chosen is not None:
                break
            if run_all(tune_cells) == 0 and worker is not None:
                time.sleep(WORKER_POLL_SECONDS)  # the rest is another worker's: wait for it
        log(f"[{tag}] chosen on the {grid.select_on} split: {chosen}")
    if tune_only:
        if worker is None:
            _write(grid, out, info, meta)
        return {
            "out": str(out),
            "ran": ran,
            "reused": reused,
            "skipped": skipped,
            "cells": len(tune_cells),
        }
    run_all(grid_lib.main_cells(grid, chosen))
    if worker is None:
        _write(grid, out, info, meta)
    total = len(tune_cells) + len(grid_lib.main_cells(grid, chosen))
    return {
        "out": str(out),
        "ran": ran,
        "reused": reused,
        "skipped": skipped,
        "cells": total,
        "seconds": time.time() - t0,
    }


def _ensure_pretrained(config: Path, log) -> dict[str, Any]:
    """Trains the grid's backbone (``pretrain:``) unless its model folder exists; returns
    what ``meta.json`` records of it (the config, the folder, and this run's summary)."""
    from ffa_jax.config import load_pretrain_config
    from ffa_jax.run.pretraining import pretrain

    folder = grid_lib.pretrain_folder(config)
    record: dict[str, Any] = {"config": str(config), "model_folder": str(folder)}
    if folder.is_dir() and any(folder.iterdir()):
        log(f"pretrained backbone {folder} exists: not retrained")
        return record
    log(f"pretraining the backbone: ffa-jax pretrain --config {config} ...")
    summary = pretrain(load_pretrain_config(config), progress=False, log=lambda *a, **k: None)
    log(f"  -> {folder}: {json.dumps(_clean(summary), default=_json_default)}")
    record["summary"] = _clean(summary)
    return record


def _cell_score(rec: dict, stage: str) -> str:
    """The number a finished cell's log line shows. With a validation split: the validation
    score the selection reads (tuning cells show nothing from the test split, so a tuning log
    cannot invite choosing on test); otherwise the test accuracy."""
    val = next((k for k in rec if k.startswith("selected_val_")), None)
    if val is not None and isinstance(rec[val], float):
        text = f", validation {val.removeprefix('selected_val_')} {rec[val]:.4f}"
        text += f" (round {rec.get('selected_round')})"
        test = rec.get("selected_test_accuracy")
        if stage != "tune" and isinstance(test, float):
            text += f", test accuracy there {test:.4f}"
        return text
    acc = rec.get("test_accuracy")
    return f", test accuracy {acc:.4f}" if isinstance(acc, float) else ""


def regenerate_table(name: str, *, quick: bool = False, out: Path | None = None) -> Path:
    """Rewrites ``table.md`` of an evidence-format results folder from its ``runs.csv`` and
    ``meta.json`` alone (no cell files, nothing run); returns its path.

    Raises:
      ConfigError: no such folder, or its ``runs.csv`` predates the evidence format.
    """
    grid = grid_lib.load_grid(grid_lib.find_grid(name), quick=quick)
    out = Path(out) if out is not None else RESULTS_DIR / (grid.name + ("-quick" if quick else ""))
    csv_path = out / "runs.csv"
    if not csv_path.is_file() or not (out / "meta.json").is_file():
        raise ConfigError(
            f"{str(out)!r} holds no runs.csv and meta.json: run the experiment first."
        )
    if not evidence_lib.is_evidence_csv(csv_path):
        raise ConfigError(
            f"{str(csv_path)!r} predates the evidence format (no {evidence_lib.FORMAT_COLUMN!r} "
            "column): its results are superseded; rerun the experiment."
        )
    evidence_lib.regenerate(grid, out)
    return out / "table.md"


def _write(grid, out: Path, info: dict, old_meta: dict) -> None:
    """Rewrites meta.json, runs.csv, table.md and the plots from every cell file."""
    cells = results_lib.load_cells(out / "cells")
    meta = dict(info)
    meta["cell_seconds_total"] = sum(c.get("wall_seconds", 0.0) for c in cells)
    meta["cells"] = len(cells)
    meta["cells_reused"] = sum(1 for c in cells if c.get("reused_from"))
    meta["commits"] = sorted({str(c.get("commit")) for c in cells})
    meta["started"] = old_meta.get("started") or info["started"]
    meta["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    if grid.evidence:
        evidence_lib.write_all(grid, out, cells, meta)
    else:
        results_lib.write_all(grid, out, cells, meta)
