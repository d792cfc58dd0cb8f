#!/usr/bin/env bash
# Issue 22's accelerator check, prepared for a session that is lent a GPU machine (one call).
#
# What it measures, with ffa-jax bench's random-weight MiniLM (no weights or data needed):
#   * the quickstart-shaped round (batch 64, 64 tokens, 2 local DP-SGD steps) with K = 10
#     clients vmapped in one jit, against the sequential PyTorch Opacus+PEFT reference (K
#     clients one after another), DP and non-DP, FFA-LoRA and LoRA;
#   * the DP step's model-FLOPs utilisation (MFU column: the known H100/H200 dense peak).
# Results land in $OUT (the device tool copies them back): bench JSON + markdown, the log,
# nvidia-smi and the package versions.
#
# Before the call, on the CPU machine, in the repository root (the device image has jax,
# flax, optax, orbax, transformers, peft and torch, but not these; pure Python or small
# manylinux wheels, a few MB together):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl jax-privacy==2.0.0 dp-accounting==0.6.0 opacus==1.6.0 gguf==0.19.0 \
#     tensorboardX==2.6.5 dm-tree pydantic pydantic-core typing-inspection annotated-types \
#     typing-extensions
#
# Then: run(command="bash experiments/gpu_check.sh", carry=[".whl"], timeout_s=540).
#
# The image's jax (0.11.x when last read) is newer than the versions ffa_jax is tested with
# (jax < 0.11); the versions are printed first so a failure can be read as such.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi (a CPU dry run?)"
python3 - <<'EOF' | tee "$OUT/versions.txt"
import importlib, jax
print("devices:", jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "jax_privacy", "dp_accounting", "torch", "peft",
             "opacus", "transformers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001 - report, do not stop
        print(name, "MISSING:", type(e).__name__, e)
EOF

# GPU_CHECK_ARGS: e.g. "--quick" for a CPU dry run of this script.
python3 -m ffa_jax.cli bench --model minilm --batch-size 64 --seq-len 64 --local-steps 2 \
  --clients 10 --round-batch-size 64 --round-seq-len 64 --repeats 5 --reference torch \
  --out "$OUT" ${GPU_CHECK_ARGS:-}
echo "bench rc=$?"
