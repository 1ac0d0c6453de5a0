#!/usr/bin/env bash
# Train on this machine through `accelerate launch` (same ranks as launch/torchrun.sh; for users whose
# tooling expects accelerate). The settings live in launch/accelerate_config.yaml.
#
#   launch/accelerate.sh CONFIG [key=value ...]        # N = visible GPUs, or 2 without a GPU
#   NPROC=4 launch/accelerate.sh configs/tiny.yaml train.steps=100
#
# Environment (optional): NPROC (processes), PYTHON (interpreter; default: the project's .venv, else
# python3), ACCELERATE_CONFIG (another accelerate config file), OMP_NUM_THREADS.
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
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
NPROC=${NPROC:-$([ "$ngpu" -gt 0 ] && echo "$ngpu" || echo 2)}
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$ROOT/launch/accelerate_config.yaml}" \
    --num_processes "$NPROC" -m llmscale train "$@"
