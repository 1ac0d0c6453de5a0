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
