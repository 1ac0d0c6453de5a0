"""One rank of a toy DeepSpeed training run with checkpoints, launched as a plain process (as srun would):
``RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT`` in the environment, the keyword arguments of
_ckpt_common.train as JSON in argv[2]. Writes RUN_DIR/result-rank{r}.json at the end; exits 75
(requeue) when a preemption signal stopped it."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import _ckpt_common as C

    from llmscale.signals import exit_code_for

    run_dir, kw = sys.argv[1], json.loads(sys.argv[2])
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    out = C.train(rank, ws, run_dir, **kw)
    Path(run_dir, f"result-rank{rank}.json").write_text(json.dumps(
        {"digest": out["digest"], "step": out["step"], "resumed": out["resumed"], "stopped": out["stopped"]}))
    dist.destroy_process_group()
    sys.exit(exit_code_for(out["stopped"]))
