"""Test setup: 8 simulated CPU devices, offline hubs. Must run before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ffa-jax train subprocesses must not fill the user's ~/.cache (tests that want the persistent
# compilation cache point JAX_COMPILATION_CACHE_DIR or this variable at a tmp folder).
os.environ.setdefault("FFA_JAX_COMPILATION_CACHE", "0")
# Likewise the memo of calibrated noise multipliers (tests of it point it at a tmp folder).
os.environ.setdefault("FFA_JAX_SIGMA_CACHE", "0")

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# CI budget (30 minutes on 2 cores, installation included): these tests took 25 s or more each
# on an idle 2-core machine (`python -m pytest -n 2 --dist loadfile --durations=60`,
# 2026-12-07), so they are marked `slow` and, like every test marked `slow` in its own file,
# are left out of the default run (pyproject's `-m "not slow"`). They run with
# `python -m pytest -m slow`; the whole suite with `python -m pytest -m "slow or not slow"`.
# Privacy accounting against dp-accounting, bit-exact resume, the secret-noise checks and the
# in-process Flower apps stay in the default run however long they take.
SLOW_TESTS = frozenset(
    {
        "tests/e2e/test_evidence_grid.py::test_quick_evidence_grid_end_to_end",
        "tests/e2e/test_flower.py::test_flower_deployment_client_level_dp_2_of_4_equals_the_simulation",
        "tests/e2e/test_flower.py::test_flower_deployment_on_loopback_equals_the_simulation",
        "tests/e2e/test_flower.py::test_keep_model_trains_every_round_in_one_node_worker",
        "tests/e2e/test_flower.py::test_a_server_stopped_mid_round_resumes_with_the_replies_already_sent",
        "tests/e2e/test_experiments.py::test_quick_privacy_sweep_end_to_end_and_resume",
        "tests/e2e/test_grid_workers.py::test_two_workers_run_each_cell_once_and_reproducibly",
        "tests/e2e/test_experiments.py::test_quick_noise_amplification",
        "tests/e2e/test_experiments.py::test_quick_theorem1",
        "tests/e2e/test_compilation_cache.py::test_second_identical_cli_run_compiles_nothing_new",
        "tests/e2e/test_bench.py::test_bench_quick_writes_report",
        "tests/e2e/test_bench.py::test_bench_allocator_ab_runs_each_worker_on_its_allocator",
        "tests/e2e/test_bench.py::test_bench_reference_torch_tiny",
        "tests/e2e/test_bench_e2e.py::test_bench_config_runs_both_sides_of_a_tiny_config",
        "tests/e2e/test_inference.py::test_llama_export_has_peft_names_and_no_absolute_path",
        "tests/e2e/test_distributed.py::test_two_processes_on_loopback_with_sharded_weights_equal_one_process",
        "tests/e2e/test_notebook.py::test_quickstart_notebook_executes",
        "tests/e2e/test_resume.py::test_sigkill_mid_save_and_mid_round_then_resume",
        "tests/e2e/test_resume.py::test_resume_refuses_when_max_epsilon_is_already_spent",
        "tests/e2e/test_variants_run.py::test_mode_trains_counts_bytes_and_resumes_bit_identically",
        "tests/unit/federated/test_sharded_loading.py::test_frozen_weights_never_whole_on_a_device_and_results_equal_one_device",
        "tests/unit/federated/test_model_sharding.py::test_model_sharded_dp_rounds_equal_unsharded",
        "tests/e2e/test_privacy_modes.py::test_sample_level_dp_charges_only_rounds_taken_part_in",
        "tests/unit/models/test_llama.py::test_smollm2_loads_and_answers_sensibly",
        "tests/e2e/test_vision.py::test_private_finetune_of_the_pretrained_vit",
        "tests/unit/test_perf.py::test_auto_equals_the_explicit_whole_batch_round",
        "tests/e2e/test_gsm_train.py::test_cli_run_trains_b_only_reports_epsilon_and_exact_match",
    }
)


def stale_slow_ids(root: Path) -> list[str]:
    """The SLOW_TESTS ids that name no test: a file that does not exist under ``root``, or one
    without a ``def`` of that test function. A stale id (a test moved or renamed) would let a
    slow test run in the default suite and blow the CI budget, so collection stops on one."""
    stale = []
    for node_id in sorted(SLOW_TESTS):
        path, _, name = node_id.partition("::")
        file = root / path
        func = name.split("::")[-1]
        if not file.is_file() or not re.search(
            rf"^\s*(async\s+)?def {re.escape(func)}\(", file.read_text(), re.M
        ):
            stale.append(node_id)
    return stale


def pytest_collection_modifyitems(config, items):
    stale = stale_slow_ids(Path(config.rootpath))
    if stale:
        raise pytest.UsageError(
            f"tests/conftest.py SLOW_TESTS names tests that do not exist: {stale}; update the "
            "ids to the tests' current paths and names."
        )
    for item in items:
        if item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
