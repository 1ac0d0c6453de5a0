#!/bin/bash
# Submit a whole pipeline as chained SLURM jobs: prepare -> pretrain -> fine-tune -> eval, each starting only
# when the one before it succeeded (`sbatch --parsable` + `--dependency=afterok:JOB`). Prints the job ids.
#
#   PREPARE_ARGS="--input corpus/ --output data/mine --vocab-size 8000 --seq-len 256" \
#   TRAIN_CONFIG=configs/gpt_gutenberg.yaml TRAIN_ARGS="data.path=data/mine run_dir=runs/pre" \
#   FINETUNE_CONFIG=configs/finetune_sst2_bert.yaml FINETUNE_ARGS="init.from=runs/pre run_dir=runs/ft" \
#   EVAL_CONFIG=configs/eval_sst2.yaml EVAL_ARGS="model=runs/ft output_dir=runs/eval" \
#   NAME=mine slurm/pipeline.sh
#
# A stage whose variable is empty is left out (e.g. no PREPARE_ARGS: start from an existing dataset). Every
# stage is safe to run again: prepare keeps a complete dataset of the same inputs (--reuse), stages write their
# outputs under temporary names and rename them (datasets, checkpoints, results.json), training resumes from its
# newest checkpoint after a requeue, and a stage that finished once writes .llmscale-jobs/NAME/STAGE.done so that
# submitting the same pipeline again skips it (delete the file to redo a stage).
#
# Environment: NAME (default: pipeline), SBATCH_OPTS (options for every job, e.g. "--partition=gpu
# --account=x"), PREPARE_OPTS / TRAIN_OPTS / FINETUNE_OPTS / EVAL_OPTS (options for one stage, e.g. "--nodes=4"),
# LLMSCALE_DIR (project folder; default: this script's parent), and what the sbatch scripts read (VENV, PYTHON).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export LLMSCALE_DIR=${LLMSCALE_DIR:-$(dirname "$here")}
cd "$LLMSCALE_DIR"
NAME=${NAME:-pipeline}
marks="$LLMSCALE_DIR/.llmscale-jobs/$NAME"
mkdir -p "$marks"
read -r -a common <<< "${SBATCH_OPTS:-}"
dep=()
ids=()

submit() {  # submit STAGE SCRIPT OPTS ARGS...: prints the job id, chains it after the previous stage
    local stage=$1 script=$2 opts=$3
    shift 3
    local -a o
    read -r -a o <<< "$opts"
    local id
    id=$(DONE_MARKER="$marks/$stage.done" sbatch --parsable --export=ALL --job-name="llmscale-$NAME-$stage" \
         "${common[@]}" "${o[@]}" "${dep[@]}" "$script" "$@")
    id=${id%%;*}
    dep=(--dependency=afterok:"$id" --kill-on-invalid-dep=yes)
    ids+=("$stage=$id")
}

if [ -n "${PREPARE_ARGS:-}" ]; then
    read -r -a a <<< "$PREPARE_ARGS"
    submit prepare "$here/prepare.sbatch" "${PREPARE_OPTS:-}" "${a[@]}" --reuse
fi
if [ -n "${TRAIN_CONFIG:-}" ]; then
    read -r -a a <<< "${TRAIN_ARGS:-}"
    submit train "$here/train.sbatch" "${TRAIN_OPTS:-}" "$TRAIN_CONFIG" "${a[@]}"
fi
if [ -n "${FINETUNE_CONFIG:-}" ]; then
    read -r -a a <<< "${FINETUNE_ARGS:-}"
    submit finetune "$here/finetune.sbatch" "${FINETUNE_OPTS:-}" "$FINETUNE_CONFIG" "${a[@]}"
fi
if [ -n "${EVAL_CONFIG:-}" ]; then
    read -r -a a <<< "${EVAL_ARGS:-}"
    submit eval "$here/eval.sbatch" "${EVAL_OPTS:-}" "$EVAL_CONFIG" "${a[@]}"
fi
if [ ${#ids[@]} -eq 0 ]; then
    echo "pipeline.sh: nothing to submit: set PREPARE_ARGS, TRAIN_CONFIG, FINETUNE_CONFIG and/or EVAL_CONFIG" >&2
    exit 2
fi
echo "${ids[*]}"
