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
