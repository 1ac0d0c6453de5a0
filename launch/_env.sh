# Shared by the launchers (sourced, not run): help text, interpreter, CPU fallback, process count.
# Expects LAUNCHER (the sourcing script's path) and the script's arguments in "$@".
ROOT=$(cd "$(dirname "$LAUNCHER")/.." && pwd)
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$LAUNCHER"
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

# run_ranks CMD...: run the launcher command (torchrun / accelerate launch) and end with llmscale's requeue code
# 75 when the ranks stopped for preemption. torchrun and accelerate turn a rank's exit 75 into their own 1, so
# the ranks leave a sign instead: every rank writes the file LLMSCALE_PREEMPTED_FILE names (and
# RUN_DIR/PREEMPTED) after the checkpoint is complete, before it exits (llmscale.artifacts.mark_preempted).
# Signals: SIGUSR1 / SIGTERM / SIGINT to this script go to the ranks themselves (the children of the launcher
# process): torchrun's agent does not handle SIGUSR1 (it would die and leave the ranks running), and on SIGTERM
# it kills the ranks 30 s later whether or not they finished saving.
run_ranks() {
    local marker rc launcher_pid
    marker=$(mktemp -u "${TMPDIR:-/tmp}/llmscale-preempted.XXXXXXXX")
    export LLMSCALE_PREEMPTED_FILE=$marker
    "$@" &
    launcher_pid=$!
    forward() { local kids; kids=$(pgrep -P "$launcher_pid" 2>/dev/null || true)
        echo "[$(basename "$LAUNCHER")] got SIG$1: forwarded to the ranks (pids ${kids:-none yet}) to save and exit" >&2
        [ -n "$kids" ] && kill -s "$1" $kids 2>/dev/null; return 0; }
    trap 'forward USR1' USR1
    trap 'forward TERM' TERM
    trap 'forward INT' INT
    # `wait` returns early when a trapped signal arrives: loop until the launcher itself is gone.
    while kill -0 "$launcher_pid" 2>/dev/null; do wait "$launcher_pid" || true; done
    rc=0
    wait "$launcher_pid" || rc=$?   # bash keeps a reaped child's status: the launcher's own exit code
    trap - USR1 TERM INT
    if [ -f "$marker" ]; then
        rm -f "$marker"
        echo "[$(basename "$LAUNCHER")] the ranks saved on a preemption signal: exit 75 (run the same command again to resume)" >&2
        return 75
    fi
    return "$rc"
}
