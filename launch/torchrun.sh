#!/usr/bin/env bash
# Train on this machine with N processes under torchrun (one per GPU; on a CPU-only machine, N ranks
# on gloo with DeepSpeed's CPU accelerator).
#
#   launch/torchrun.sh CONFIG [key=value ...]          # N = visible GPUs, or 2 without a GPU
#   NPROC=4 launch/torchrun.sh configs/quickstart.yaml train.steps=100
#
# Environment (optional): NPROC (processes), PYTHON (interpreter; default: the project's .venv, else
# python3), OMP_NUM_THREADS (default: CPU cores / NPROC, at least 1).
# Preemption: SIGUSR1 or SIGTERM to this script (or to any rank) -> the ranks save -> exit code 75.
# For several machines use slurm/train.sbatch (SLURM) or torchrun --nnodes with --rdzv-endpoint.
set -euo pipefail
LAUNCHER="${BASH_SOURCE[0]}"
source "$(dirname "$LAUNCHER")/_env.sh"
run_ranks "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m llmscale train "$@"
