"""``ffa-jax bench``: :mod:`~ffa_jax.bench.core` (timings, memory probes, the report),
:mod:`~ffa_jax.bench.spec` (the workload every variant gets), :mod:`~ffa_jax.bench.torch_ref`
(the PyTorch Opacus+PEFT reference) and :mod:`~ffa_jax.bench.allocator_ab` (``--allocator-ab``:
system malloc vs tcmalloc in worker processes)."""

from ffa_jax.bench.core import (
    CHUNK_BOUND_SLACK_MB,
    MEMORY_BUDGET_MB,
    chunk_bound,
    compiled_memory,
    library_fusion_ab,
    machine_info,
    memory_probe,
    report_stem,
    round_robin,
    run_bench,
    run_memory_probes,
    to_markdown,
    write_report,
)
from ffa_jax.bench.spec import (
    MINILM,
    MODELS,
    ROBERTA_BASE,
    TINY,
    BenchSpec,
    client_update_args,
    random_batches,
    random_encoder,
    round_setup,
)

__all__ = [
    "BenchSpec",
    "CHUNK_BOUND_SLACK_MB",
    "MEMORY_BUDGET_MB",
    "MINILM",
    "MODELS",
    "ROBERTA_BASE",
    "TINY",
    "chunk_bound",
    "client_update_args",
    "compiled_memory",
    "library_fusion_ab",
    "machine_info",
    "memory_probe",
    "random_batches",
    "random_encoder",
    "report_stem",
    "round_robin",
    "round_setup",
    "run_bench",
    "run_memory_probes",
    "to_markdown",
    "write_report",
]
