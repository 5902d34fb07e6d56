#!/usr/bin/env bash
# Every GPU check in one invocation (issue 7). On a GPU machine:
#   bash benchmarks/gpu_check.sh            # Llama 3 8B config, random bf16 weights
#   bash benchmarks/gpu_check.sh --quick    # 64 new tokens, no per-op profile, no optional checks
# On a CPU it runs a tiny config so the script itself stays tested:
#   CFJAX_GPU_CHECK_CONFIG=tiny bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
config=${CFJAX_GPU_CHECK_CONFIG:-llama3-8b}
if [ "$config" = tiny ]; then
  args=(--config tiny --prompt-len 40 --new-tokens 24 --batches 1 4 --profile-steps 8 --attribution-words 5)
else
  # Issue 31: the whole run in 6 minutes on an H200; the optional checks (the yardsticks at
  # batch 64, the batch-variant compile split, attribution, model_blocks) start only within 300 s
  # of its start (`--budget-s 0` after these: always).
  args=(--config "$config" --prompt-len 512 --new-tokens 256 --batches 1 64 --profile-steps 64 --budget-s 300)
fi
# The accelerator image's own flax may predate NNX's List, and it has no llama-models (the Llama 3
# tokenizer of the attribution sweep): carried wheels (.whl/, `make gpu-wheels`) go first.
export PYTHONPATH=.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=.:/tmp/site
fi
python3 -c 'import jax, flax; print("devices:", jax.devices(), "jax", jax.__version__, "flax", flax.__version__)'
# JAX takes 75% of the GPU's memory up front by default; the transformers peer and the per-batch
# profiles run in child processes beside this one (an 8B model's 16 GB each), which on an H100
# would not fit in the rest. Grown on demand, this process holds only what it uses (~40 GB).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
# The JSON is rewritten after every check: on a lent machine ($OUT comes back even when the
# command runs past its time limit) nothing measured is lost.
if [ -n "${OUT:-}" ]; then args+=(--out "$OUT/gpu_check.json"); fi
python3 benchmarks/gpu_check.py "${args[@]}" "$@"
