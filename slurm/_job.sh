# Shared body of slurm/train.sbatch, finetune.sbatch and eval.sbatch (sourced, not submitted): signals, the
# interpreter, rank discovery, one srun step of `python -m llmscale $JOB CONFIG [key=value ...]`, requeue.
# The calling script sets JOB (train | finetune | eval) and passes its own arguments.
#
# Exit protocol: 75 from the step (a rank saved on SIGUSR1/SIGTERM) -> `scontrol requeue` (MAX_REQUEUES); a lost
# rank (a rank wrote $LLMSCALE_PEER_LOST_FILE, exit 76) -> requeue (MAX_FAILURE_REQUEUES, default 3); 0 -> done
# (DONE_MARKER written when set); anything else is returned as the job's failure.
#
# Why srun per task and not torchrun per node: the early-warning signal must reach the job's processes
# themselves, and their "requeue me" exit code must come back to this script. torchrun's agent dies on
# SIGUSR1 (it does not handle it by default), turns any worker exit into its own failure code and SIGKILLs
# the workers 30 s after forwarding SIGTERM. srun forwards SIGUSR1/SIGTERM to every task and returns the
# highest task exit code, so the save-then-exit protocol of llmscale.signals survives end to end.

set -uo pipefail

log() { echo "[$JOB.sbatch $(date -u +%H:%M:%S) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

# Signals, installed first so that an early warning during start-up is not lost. srun (below) runs in
# the background so that bash can run a trap while the step is going.
# USR1 (--signal=B:USR1@N, `scancel --batch --signal=USR1`) reaches only this shell: forward it once;
# srun passes it to every task. SIGTERM (scancel, preemption, time limit) is delivered by SLURM to the
# tasks themselves: forwarding it would be a second signal, which llmscale.signals treats as "exit now
# without saving", so the trap only records it and keeps waiting for the tasks to save.
signalled=""
srun_pid=""
on_usr1() {
    signalled=USR1
    if [ -n "$srun_pid" ]; then
        log "got SIGUSR1: asking the $JOB job to checkpoint and exit (forwarded to srun pid $srun_pid)"
        kill -s USR1 "$srun_pid" 2>/dev/null
    else
        log "got SIGUSR1 before the $JOB step started"
    fi
}
on_term() {
    signalled=TERM
    log "got SIGTERM: SLURM signals the tasks directly; waiting for them to checkpoint and exit"
}
trap on_usr1 USR1
trap on_term TERM

CONFIG=${CONFIG:-${1:-}}
[ "${1:-}" = "$CONFIG" ] && [ $# -gt 0 ] && shift
if [ -z "$CONFIG" ]; then
    echo "$JOB.sbatch: no config given. Submit as: sbatch slurm/$JOB.sbatch CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "$JOB.sbatch: not inside a SLURM job. Submit it with sbatch (or run launch/torchrun.sh on a workstation)." >&2
    exit 2
fi

cd "${LLMSCALE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}" || { echo "$JOB.sbatch: cannot cd to ${LLMSCALE_DIR:-$SLURM_SUBMIT_DIR}" >&2; exit 2; }
VENV=${VENV:-$PWD/.venv}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$VENV/bin/python" ]; then PYTHON=$VENV/bin/python; export PATH="$VENV/bin:$PATH"; else PYTHON=$(command -v python3); fi
fi
if [ ! -f "$CONFIG" ]; then
    echo "$JOB.sbatch: config $CONFIG not found (relative to $PWD). Pass a path or set LLMSCALE_DIR." >&2
    exit 2
fi

# Every task derives its rank from SLURM_*; stale torchrun variables from the submit shell would win.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The first node's address as SLURM knows it (NodeAddr), which is its name on most clusters.
node_addr=$(scontrol show node -o "$first_node" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
export MASTER_ADDR=${node_addr:-$first_node}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [ -z "${DS_ACCELERATOR:-}" ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR=cpu   # no GPU on this node: DeepSpeed's CPU accelerator, gloo collectives
fi

NNODES=${SLURM_NNODES:-1}
if [ -n "${GPUS_PER_NODE:-}" ]; then PPN=$GPUS_PER_NODE
elif [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then PPN=${SLURM_NTASKS_PER_NODE%%(*}   # may read "8(x4)"
elif [ -n "${SLURM_NTASKS:-}" ]; then PPN=$((SLURM_NTASKS / NNODES))            # submitted with --ntasks only
else PPN=${SLURM_GPUS_ON_NODE:-1}
fi
REQUEUE_CODE=$("$PYTHON" -c 'from llmscale.signals import EXIT_REQUEUE; print(EXIT_REQUEUE)' 2>/dev/null || echo 75)
MAX_REQUEUES=${MAX_REQUEUES:-50}
MAX_FAILURE_REQUEUES=${MAX_FAILURE_REQUEUES:-3}

# A step of a pipeline (slurm/pipeline.sh) that already finished is not run again: DONE_MARKER names a file
# written when the step exits 0.
if [ -n "${DONE_MARKER:-}" ] && [ -f "$DONE_MARKER" ]; then
    log "already done ($DONE_MARKER exists): nothing to run"
    exit 0
fi

# A rank that sees another rank vanish (a dead node: llmscale.dist.PeerMonitor, train.peer_timeout_s) writes what
# it saw here and exits 76; the ranks of the dead node exit however they were killed, so srun's code alone
# cannot tell. The file is on the shared filesystem (the project folder) beside the job's log.
mkdir -p "$PWD/.llmscale-jobs"
export LLMSCALE_PEER_LOST_FILE="$PWD/.llmscale-jobs/peer-lost-${SLURM_JOB_ID}"
rm -f "$LLMSCALE_PEER_LOST_FILE"

log "nodes=$SLURM_JOB_NODELIST ($NNODES) procs/node=$PPN master=$MASTER_ADDR:$MASTER_PORT accelerator=${DS_ACCELERATOR:-cuda} config=$CONFIG $*"

# Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: pass it on, or every rank would
# be confined to one CPU (data loading, OMP threads) where CPU binding is enforced.
step_opts=(--nodes="$NNODES" --ntasks=$((NNODES * PPN)) --ntasks-per-node="$PPN" --wait="${STEP_GRACE_S:-600}")
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && step_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
if [ -n "$signalled" ]; then
    rc=$REQUEUE_CODE   # warned before anything started: nothing to save, run again later
else
    srun "${step_opts[@]}" "$PYTHON" -m llmscale "$JOB" "$CONFIG" "$@" &
    srun_pid=$!
    # `wait` returns early when a trapped signal arrives: loop until srun itself is gone.
    while kill -0 "$srun_pid" 2>/dev/null; do
        wait "$srun_pid"
    done
    wait "$srun_pid"   # bash keeps a reaped child's status: this is srun's exit code, not the trap's 128+n
    rc=$?
fi
log "$JOB step exited with code $rc"

if [ "$rc" -eq 0 ]; then
    [ -n "${DONE_MARKER:-}" ] && { mkdir -p "$(dirname "$DONE_MARKER")"; date -u +%FT%TZ > "$DONE_MARKER"; }
    exit 0
fi
if [ -f "$LLMSCALE_PEER_LOST_FILE" ]; then
    log "a rank was lost: $(cat "$LLMSCALE_PEER_LOST_FILE")"
    rm -f "$LLMSCALE_PEER_LOST_FILE"
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_FAILURE_REQUEUES" ]; then
        log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_FAILURE_REQUEUES=$MAX_FAILURE_REQUEUES)"
        exit "$rc"
    fi
    log "requeueing job $SLURM_JOB_ID after the lost rank; the next run resumes from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
# The requeue code means "checkpoint saved, run me again". A step killed by the forwarded signal
# before the job had installed its handler lost nothing beyond the last checkpoint: requeue too.
if [ "$rc" -eq "$REQUEUE_CODE" ] || { [ -n "$signalled" ] && [ "$rc" -gt 128 ]; }; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
        log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=$MAX_REQUEUES)"
        exit "$rc"
    fi
    log "requeueing job $SLURM_JOB_ID; the next run resumes from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
