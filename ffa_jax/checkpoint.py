"""Checkpoints of the whole run state (orbax), and the checks that make resuming safe.

A checkpoint is one orbax step folder ``<run_dir>/checkpoints/<round>/`` with two items:

* ``state``: the :class:`~ffa_jax.federated.server.ServerState` (the server's trainable tree
  -- B, and A too in LoRA mode, plus a trained head -- the server optimiser state and the
  round counter), flattened to ``{"000000": array, ...}`` (orbax ``StandardSave``);
* ``meta``: one JSON document (orbax ``JsonSave``) with everything else a resumed run needs
  or checks: the completed round, the root seed, the resolved config, the privacy ledger
  (:class:`ffa_jax.privacy.ledger.PrivacyLedger`: sigma_k, q_k, z, rounds each client took
  part in, epsilon spent with PLD and RDP), the metrics history so far, a SHA-256 of the
  frozen A matrices (regenerated from the seed), of the client data and of every saved array,
  and the path, shape and dtype of every leaf.

The run's **secret** (:mod:`ffa_jax.privacy.secret`, ``meta["noise_secret"]``): the noise
keys, the host-side Poisson sampler and the participants of every round are pure functions of
``(secret, round)``, so the checkpoint stores the secret and a resumed run regenerates them
bit-identically. The secret is the operator's private state: whoever reads it can regenerate
every noise draw and subtract it. So the ``checkpoints/`` folder is created owner-only
(``0700``) and every file of a step is made ``0600`` before the step is finalised; never
publish or share checkpoints. It is never written anywhere else (``config.yaml``,
``metrics.jsonl``, ``summary.md``, the adapter). The frozen A and the data partition are
functions of the public ``seed``. Epsilon is a stateless function of the ledger's parameters
and counts, so the ledger stores those and the value spent.

Atomicity: orbax writes a step into ``<round>.orbax-checkpoint-tmp-<time>/`` and renames it
to ``<round>/`` only when every file is written, so a crash during a save leaves the previous
checkpoint intact and never a half-written step under a final name; unfinalised tmp folders are
ignored when reading and deleted when a run is resumed. Old steps are deleted only after the
new one is finalised (``checkpoint.keep``). On restore every array is checked against its
SHA-256 in ``meta``, so a damaged checkpoint raises :class:`CheckpointError` instead of being
loaded. Only safe formats are read: orbax/tensorstore arrays and JSON (no pickle).

Which config fields may change on resume (everything else must match the checkpoint):
:data:`RESUMABLE_FIELDS` -- the run's name and folder, ``federated.rounds`` (to extend or
shorten a run; a DP run calibrated to ``privacy.epsilon`` refuses an extension that would
spend more than that budget), ``privacy.max_epsilon`` (a cap, checked on resume), evaluation cadence/batch size, ``perf.*`` (speed and memory
only) and ``checkpoint.*``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ffa_jax import lora
from ffa_jax.config import RunConfig, from_dict
from ffa_jax.errors import CheckpointError, ConfigError
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.privacy.ledger import PrivacyLedger
from ffa_jax.types import PyTree

CHECKPOINTS = "checkpoints"
FORMAT = "ffa_jax.checkpoint/2"  # 2: holds the run's secret (noise_secret)
ITEMS = ("state", "meta")
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax: "<step>.orbax-checkpoint-tmp-<time>"

#: Config fields (dotted; ``section.*`` for a whole section) that may differ between a
#: checkpoint and the run that resumes it. None of them changes the training trajectory.
RESUMABLE_FIELDS = (
    "name",
    "output_dir",
    "federated.rounds",
    "privacy.max_epsilon",
    "eval.every",
    "eval.batch_size",
    "perf.*",
    "checkpoint.*",
)


# --------------------------------------------------------------------------- fingerprints


def _sha256_array(x: np.ndarray) -> str:
    x = np.ascontiguousarray(x)
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.tobytes())
    return h.hexdigest()


def a_matrices_hash(params: PyTree) -> str:
    """SHA-256 of every LoRA node's ``a`` (path, dtype, shape and bytes), in path order.

    Computed on the freshly initialised tree, it identifies the shared A that the root seed
    regenerates; a resumed run recomputes it and refuses a mismatch.
    """
    h = hashlib.sha256()
    for path, node in sorted(lora.lora_nodes(params).items()):
        h.update(path.encode())
        h.update(_sha256_array(np.asarray(node.a)).encode())
    return h.hexdigest()


def data_hash(arrays: Iterable[Mapping[str, np.ndarray]], parts: Sequence[np.ndarray]) -> str:
    """SHA-256 of tokenised data (``arrays``: dicts of arrays) and the client partition."""
    h = hashlib.sha256()
    for d in arrays:
        for k in sorted(d):
            h.update(k.encode())
            h.update(_sha256_array(np.asarray(d[k])).encode())
    for k, p in enumerate(parts):
        h.update(f"client{k}".encode())
        h.update(_sha256_array(np.asarray(p)).encode())
    return h.hexdigest()


def leaf_table(tree: PyTree) -> list[dict[str, Any]]:
    """``[{"path", "shape", "dtype"}]`` of the array leaves of ``tree`` in flatten order."""
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        out.append({"path": lora.path_str(path), "shape": list(np.shape(x)), "dtype": str(x.dtype)})
    return out


# --------------------------------------------------------------------------- config


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _resumable(field: str) -> bool:
    return any(
        field == f or (f.endswith(".*") and field.startswith(f[:-1])) for f in RESUMABLE_FIELDS
    )


def check_config(saved: Mapping[str, Any], cfg: RunConfig, where: str) -> RunConfig:
    """Checks that ``cfg`` may resume a checkpoint written with the config ``saved``.

    Fields missing from ``saved`` (written by an older ffa_jax) take their defaults.

    Returns:
      The checkpoint's config.

    Raises:
      CheckpointError: a field outside :data:`RESUMABLE_FIELDS` differs (the message lists
        every such field with both values and the fix), or ``saved`` is not a valid config.
    """
    try:
        old = from_dict(RunConfig, saved)
    except ConfigError as e:
        raise CheckpointError(
            f"checkpoint {where} holds a config this version of ffa_jax cannot read ({e}); "
            "resume it with the ffa_jax version that wrote it, or start a new run."
        ) from e
    a, b = _flatten(old.to_dict()), _flatten(cfg.to_dict())
    diffs = [
        f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not _resumable(k)
    ]
    if old.privacy.mechanism == "banded_mf" and old.federated.rounds != cfg.federated.rounds:
        raise ConfigError(
            f"federated.rounds={cfg.federated.rounds} is invalid: checkpoint {where} ran "
            "privacy.mechanism=banded_mf, whose strategy matrix (and correlated noise state) "
            f"was optimised for federated.rounds={old.federated.rounds}; a banded_mf run "
            f"resumes only with federated.rounds={old.federated.rounds}. Start a new run to "
            "train longer."
        )
    if (
        old.privacy.mechanism == "banded_mf"
        and old.privacy.unit == "sample"
        and old.federated.local_steps != cfg.federated.local_steps
    ):
        raise ConfigError(
            f"federated.local_steps={cfg.federated.local_steps} is invalid: checkpoint {where} "
            "ran sample-level privacy.mechanism=banded_mf, whose clients' strategy matrix and "
            "noise streams were sized for federated.rounds x federated.local_steps = "
            f"{old.federated.rounds} x {old.federated.local_steps} steps; resume with "
            f"federated.local_steps={old.federated.local_steps}, or start a new run."
        )
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} was written with another config; these fields differ and would "
            "change the results:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the checkpoint's values (drop those --set overrides), or start a new "
            "run with --set name=<new-name>. Only "
            + ", ".join(RESUMABLE_FIELDS)
            + " may change on resume."
        )
    return old


# --------------------------------------------------------------------------- ledger


def _finite_or_none(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def history_to_json(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metrics records as strict JSON (a non-private epsilon of inf is written as null)."""
    return [{k: _finite_or_none(v) for k, v in h.items()} for h in history]


def history_from_json(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Inverse of :func:`history_to_json` (``epsilon: null`` -> inf)."""
    out = []
    for r in records:
        r = dict(r)
        if "epsilon" in r and r["epsilon"] is None:
            r["epsilon"] = math.inf
        out.append(r)
    return out


# --------------------------------------------------------------------------- save


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _orbax():
    import orbax.checkpoint as ocp  # deferred: ~0.5 s import

    return ocp


def _flat_state(state: PyTree) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    leaves = jax.tree_util.tree_leaves(state)
    table = leaf_table(state)
    arrays = {f"{i:06d}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}
    for row, x in zip(table, arrays.values(), strict=True):
        row["sha256"] = _sha256_array(x)
    return arrays, table


class Checkpointer:
    """Writes the run's checkpoints (synchronously: a save has finished when it returns).

    Opening it deletes unfinalised tmp folders left by a crash (they are never read).

    Args:
      directory: ``<run_dir>/checkpoints``.
      keep: keep the newest this many steps.
    """

    def __init__(self, directory: str | Path, *, keep: int):
        ocp = _orbax()
        self.directory = Path(directory)
        # Owner-only: the checkpoints hold the run's secret (see the module docstring).
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        # The run is the only writer of its checkpoints, so every tmp folder is garbage from a
        # crash. Deleted here, synchronously (orbax's own cleanup runs in the background).
        for p in unfinalized(self.directory):
            shutil.rmtree(p)
        options = dict(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        if jax.process_count() > 1:
            # A multi-process run: the state is a host copy every process holds, so this
            # process (0) writes alone, and orbax must not wait for the others at barriers.
            self.directory.mkdir(parents=True, exist_ok=True)
            options.update(
                create=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=jax.process_index(), active_processes={jax.process_index()}
                ),
            )
        self._mgr = ocp.CheckpointManager(
            self.directory.absolute(),
            options=ocp.CheckpointManagerOptions(**options),
            item_names=ITEMS,
        )

    def save(
        self,
        round_done: int,
        state: PyTree,
        *,
        cfg: RunConfig,
        history: Sequence[Mapping[str, Any]],
        ledger: PrivacyLedger,
        a_hash: str,
        data_fingerprint: str,
        secret: int,
    ) -> Path:
        """Saves the state after ``round_done`` completed rounds as step ``round_done``,
        with the run's ``secret`` (owner-only files, see the module docstring)."""
        ocp = _orbax()
        arrays, table = _flat_state(state)
        meta = {
            "format": FORMAT,
            "round": int(round_done),
            "seed": cfg.seed,
            "config": cfg.to_dict(),
            "a_hash": a_hash,
            "data_hash": data_fingerprint,
            "leaves": table,
            "privacy": ledger.to_json(),
            "history": history_to_json(history),
            "versions": _versions(),
            "noise_secret": secret_lib.to_hex(secret),
        }
        # Files created by orbax while this process's umask is 077 are owner-only from the
        # start (the folder is 0700 already); restored right after.
        old_umask = os.umask(0o077)
        try:
            self._save(round_done, arrays, meta, ocp)
        finally:
            os.umask(old_umask)
        step_dir = self.directory / str(int(round_done))
        owner_only(step_dir)
        return step_dir

    def _save(self, round_done, arrays, meta, ocp) -> None:
        self._mgr.save(
            int(round_done),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoCheckpointer:
    """Stands in for :class:`Checkpointer` on processes other than 0 of a multi-process run
    (process 0 writes the checkpoints)."""

    def save(self, round_done: int, state: PyTree, **kwargs) -> None:
        return None

    def __enter__(self) -> NoCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        return None


def owner_only(path: Path) -> None:
    """``chmod`` a checkpoint step: folders ``0700``, files ``0600`` (it holds the secret)."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o700)
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
        for f in files:
            os.chmod(os.path.join(root, f), 0o600)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ffa_jax", "jax", "orbax-checkpoint", "dp-accounting"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = "unknown"
    return out


# --------------------------------------------------------------------------- read


def finalized_steps(directory: str | Path) -> list[int]:
    """Rounds with a finalised checkpoint in ``directory`` (ascending); unfinalised orbax tmp
    folders (a crash during a save) are not listed. Reads only: creates and deletes nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.iterdir():
        # orbax finalises a step by renaming "<step>.orbax-checkpoint-tmp-<t>" to "<step>".
        if p.is_dir() and re.fullmatch(r"\d+", p.name):
            steps.append(int(p.name))
    return sorted(steps)


def unfinalized(directory: str | Path) -> list[Path]:
    """Orbax tmp folders in ``directory``: saves that never finished (never read)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and TMP_MARK in p.name)


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint's metadata (read and validated) and, once loaded, its state."""

    step_dir: Path
    round: int
    config: RunConfig
    seed: int
    a_hash: str
    data_hash: str
    leaves: list[dict[str, Any]]
    ledger: PrivacyLedger
    history: list[dict[str, Any]]
    secret: int = dataclasses.field(repr=False, compare=False)


def _read_json_item(path: Path) -> Any:
    ocp = _orbax()
    reader = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    try:
        return reader.restore(path.absolute())
    finally:
        reader.close()


def _read_array_item(path: Path, target: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ocp = _orbax()
    reader = ocp.StandardCheckpointer()
    try:
        return reader.restore(path.absolute(), target)
    finally:
        reader.close()


def _damaged(step_dir: Path, what: str, others: Sequence[int]) -> CheckpointError:
    prev = [s for s in others if s < int(step_dir.name)]
    fix = (
        f"delete {str(step_dir)!r} to resume from the previous checkpoint (round {prev[-1]})"
        if prev
        else f"delete {str(step_dir)!r} to start the run again from round 0"
    )
    return CheckpointError(
        f"checkpoint {str(step_dir)!r} is damaged: {what}. It was not loaded; {fix}, or start "
        "a new run with --set name=<new-name>."
    )


def read_latest(directory: str | Path, cfg: RunConfig) -> Restored | None:
    """Reads and checks the metadata of the newest finalised checkpoint (no arrays yet).

    Returns:
      None when ``directory`` holds no finalised checkpoint.

    Raises:
      CheckpointError: the metadata is unreadable/truncated or from another format, or the
        checkpoint was written with a config that differs from ``cfg`` in a field that
        changes results (see :func:`check_config`).
    """
    directory = Path(directory)
    steps = finalized_steps(directory)
    if not steps:
        return None
    step = steps[-1]
    step_dir = directory / str(step)
    meta_file = step_dir / "meta" / "metadata"
    if not meta_file.is_file():
        raise _damaged(step_dir, f"its metadata file {str(meta_file)!r} is missing", steps)
    try:
        meta = _read_json_item(step_dir / "meta")
    except Exception as e:  # noqa: BLE001 - orbax/json raise many types for damaged files
        raise _damaged(
            step_dir,
            f"its metadata {str(meta_file)!r} cannot be read ({type(e).__name__}: {e})",
            steps,
        ) from e
    where = repr(str(step_dir))
    needed = (
        "format",
        "round",
        "seed",
        "config",
        "a_hash",
        "data_hash",
        "leaves",
        "privacy",
        "noise_secret",
    )
    if isinstance(meta, dict) and meta.get("format") == "ffa_jax.checkpoint/1":
        raise CheckpointError(
            f"checkpoint {str(step_dir)!r} was written by an older ffa_jax whose noise came from "
            "the public seed (format ffa_jax.checkpoint/1, no secret): its run cannot be resumed "
            "as a private run. Start a new run (--overwrite or --set name=<new-name>)."
        )
    if not isinstance(meta, dict) or any(k not in meta for k in needed):
        raise _damaged(step_dir, f"{str(meta_file)!r} lacks the fields {list(needed)}", steps)
    if meta["format"] != FORMAT:
        raise CheckpointError(
            f"checkpoint {where} has format {meta['format']!r}, this ffa_jax reads {FORMAT!r}; "
            "resume it with the version that wrote it, or start a new run."
        )
    if meta["round"] != step:
        raise _damaged(
            step_dir, f"its metadata says round {meta['round']}, its folder {step}", steps
        )
    old_cfg = check_config(meta["config"], cfg, where)
    try:
        ledger = PrivacyLedger.from_json(meta["privacy"])
    except (TypeError, KeyError) as e:
        raise _damaged(step_dir, f"its privacy ledger is malformed ({e})", steps) from e
    history = history_from_json(meta.get("history", []))
    # Round 0 is the pretrained model's evaluation (eval.baseline), present iff it is on.
    first = 0 if old_cfg.eval.baseline else 1
    if [h.get("round") for h in history] != list(range(first, step + 1)):
        raise _damaged(
            step_dir, f"its metrics history does not cover rounds {first}..{step}", steps
        )
    return Restored(
        step_dir=step_dir,
        round=step,
        config=old_cfg,
        seed=int(meta["seed"]),
        a_hash=str(meta["a_hash"]),
        data_hash=str(meta["data_hash"]),
        leaves=list(meta["leaves"]),
        ledger=ledger,
        history=history,
        secret=_read_secret(meta["noise_secret"], step_dir, steps),
    )


def _read_secret(text: Any, step_dir: Path, steps: Sequence[int]) -> int:
    try:
        return secret_lib.from_hex(text)
    except (TypeError, ValueError) as e:
        raise _damaged(step_dir, "its noise_secret is not a hex integer", steps) from e


def check_leaves(restored: Restored, like: PyTree) -> None:
    """The checkpoint's leaves must be exactly the leaves of ``like`` (path, shape, dtype).

    Raises:
      CheckpointError: naming every missing, unexpected or misshapen leaf.
    """
    want = {r["path"]: r for r in leaf_table(like)}
    got = {r["path"]: r for r in restored.leaves}
    problems = [f"missing: {p} {want[p]['shape']} {want[p]['dtype']}" for p in want if p not in got]
    problems += [
        f"unexpected: {p} {got[p]['shape']} {got[p]['dtype']}" for p in got if p not in want
    ]
    for p in want.keys() & got.keys():
        w, g = want[p], got[p]
        if list(w["shape"]) != list(g["shape"]) or w["dtype"] != g["dtype"]:
            problems.append(
                f"{p}: checkpoint {g['shape']} {g['dtype']}, model {w['shape']} {w['dtype']}"
            )
    if problems:
        raise CheckpointError(
            f"checkpoint {str(restored.step_dir)!r} does not fit this model's trainable tree "
            f"({len(problems)} problem(s); was it written for another model.name, lora or server "
            "setting, or did the model folder change?):\n  " + "\n  ".join(problems[:20])
        )


def restore_state(restored: Restored, like: PyTree) -> PyTree:
    """Loads the arrays of ``restored`` (as numpy, on the host) into the structure of
    ``like``, checking every SHA-256.

    Raises:
      CheckpointError: leaves do not fit ``like``, an array file is truncated or unreadable,
        or an array's bytes differ from the hash recorded at save time.
    """
    check_leaves(restored, like)
    step_dir = restored.step_dir
    steps = finalized_steps(step_dir.parent)
    treedef = jax.tree_util.tree_structure(like)
    by_path = {r["path"]: r for r in restored.leaves}
    table = leaf_table(like)
    # Saved arrays are keyed by their index at save time; map them to this tree's order.
    saved_index = {r["path"]: i for i, r in enumerate(restored.leaves)}
    target = {
        f"{saved_index[r['path']]:06d}": np.zeros(r["shape"], np.dtype(r["dtype"])) for r in table
    }
    try:
        arrays = _read_array_item(step_dir / "state", target)
    except Exception as e:  # noqa: BLE001 - tensorstore raises many types for damaged files
        raise _damaged(
            step_dir,
            f"its arrays in {str(step_dir / 'state')!r} cannot be read ({type(e).__name__}: {e})",
            steps,
        ) from e
    out = []
    for r in table:
        x = np.asarray(arrays[f"{saved_index[r['path']]:06d}"])
        if _sha256_array(x) != by_path[r["path"]].get("sha256"):
            raise _damaged(
                step_dir,
                f"array {r['path']} does not match the SHA-256 recorded at save time",
                steps,
            )
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = [
    "CHECKPOINTS",
    "RESUMABLE_FIELDS",
    "Checkpointer",
    "PrivacyLedger",
    "Restored",
    "a_matrices_hash",
    "check_config",
    "check_leaves",
    "checkpoint_dir",
    "data_hash",
    "finalized_steps",
    "unfinalized",
    "leaf_table",
    "read_latest",
    "restore_state",
]
