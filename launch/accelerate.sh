#!/usr/bin/env bash
# Train on this machine through `accelerate launch` (same ranks as launch/torchrun.sh; for users whose
# tooling expects accelerate). The settings live in launch/accelerate/multi_gpu.yaml.
#
#   launch/accelerate.sh CONFIG [key=value ...]        # N = visible GPUs, or 2 without a GPU
#   NPROC=4 launch/accelerate.sh configs/quickstart.yaml train.steps=100
#
# Preemption: SIGUSR1 or SIGTERM to this script (or to any rank) -> the ranks save -> exit code 75.
#
# Environment (optional): NPROC (processes), PYTHON (interpreter; default: the project's .venv, else
# python3), ACCELERATE_CONFIG (another accelerate config file), OMP_NUM_THREADS.
set -euo pipefail
LAUNCHER="${BASH_SOURCE[0]}"
source "$(dirname "$LAUNCHER")/_env.sh"
run_ranks "$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$ROOT/launch/accelerate/multi_gpu.yaml}" \
    --num_processes "$NPROC" -m llmscale train "$@"
