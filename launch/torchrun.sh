#!/usr/bin/env bash
# Train on this machine with N processes under torchrun (one per GPU; on a CPU-only machine, N ranks
# on gloo with DeepSpeed's CPU accelerator).
#
#   launch/torchrun.sh CONFIG [key=value ...]          # N = visible GPUs, or 2 without a GPU
#   NPROC=4 launch/torchrun.sh configs/tiny.yaml train.steps=100
#
# Environment (optional): NPROC (processes), PYTHON (interpreter; default: the project's .venv, else
# python3), OMP_NUM_THREADS (default: CPU cores / NPROC, at least 1).
# For several machines use slurm/train.sbatch (SLURM) or torchrun --nnodes with --rdzv-endpoint.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    exit 2
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
ngpu=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$ngpu" = 0 ]; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}   # no GPU: DeepSpeed's CPU accelerator, gloo collectives
fi
NPROC=${NPROC:-$([ "$ngpu" -gt 0 ] && echo "$ngpu" || echo 2)}
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m llmscale train "$@"
