"""The run layer: prepare a run, its round inputs, the loop, the run directory, resume checks,
the privacy planner, the privacy audit of a run, pretraining, and loading a finished run.

Modules, one job each: :mod:`~ffa_jax.run.setup` (validate and load everything, keys, the
jitted round), :mod:`~ffa_jax.run.inputs` (one round's participants and batches),
:mod:`~ffa_jax.run.loop` (:func:`train`), :mod:`~ffa_jax.run.rundir` (the one owner of
``config.yaml``, ``metrics.jsonl`` and ``adapter.safetensors``), :mod:`~ffa_jax.run.resume`,
:mod:`~ffa_jax.run.planner` (``ffa-jax privacy``), :mod:`~ffa_jax.run.audit` (``ffa-jax
audit``), :mod:`~ffa_jax.run.pretraining` (``ffa-jax pretrain``), :mod:`~ffa_jax.run.report`
(summary and plots) and :mod:`~ffa_jax.run.inference` (``load_run``, generate/predict/eval,
``export_run_peft``).
"""

from ffa_jax.errors import DataError
from ffa_jax.run.inference import LoadedRun, export_run_peft, load_run
from ffa_jax.run.inputs import ScheduledRound, client_batches, round_inputs, run_round
from ffa_jax.run.loop import NonFiniteError, check_finite, silent, train
from ffa_jax.run.report import metric_value
from ffa_jax.run.resume import check_budget, resume_config
from ffa_jax.run.rundir import (
    NON_METRIC_KEYS,
    metric_line,
    noise_line,
    privacy_line,
    run_dir,
    save_adapter,
)
from ffa_jax.run.setup import (
    KEY_HEAD,
    KEY_LORA_A,
    KEY_TRAIN,
    SAMPLER_PURPOSE,
    Prepared,
    build_client_update,
    build_round,
    client_weights,
    evaluate,
    evaluate_splits,
    initial_params,
    noise_note,
    prepare,
    privacy_plan,
    root_key,
    run_secret,
    train_compiler_options,
    train_key,
)

__all__ = [
    "DataError",
    "KEY_HEAD",
    "KEY_LORA_A",
    "KEY_TRAIN",
    "LoadedRun",
    "NON_METRIC_KEYS",
    "NonFiniteError",
    "Prepared",
    "SAMPLER_PURPOSE",
    "ScheduledRound",
    "build_client_update",
    "build_round",
    "check_budget",
    "check_finite",
    "client_batches",
    "client_weights",
    "evaluate",
    "evaluate_splits",
    "export_run_peft",
    "initial_params",
    "load_run",
    "metric_line",
    "metric_value",
    "noise_line",
    "noise_note",
    "prepare",
    "privacy_line",
    "privacy_plan",
    "resume_config",
    "root_key",
    "round_inputs",
    "run_dir",
    "run_round",
    "run_secret",
    "save_adapter",
    "silent",
    "train",
    "train_compiler_options",
    "train_key",
]
