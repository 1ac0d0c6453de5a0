"""The process groups of a parallel layout: DeepSpeed's grid over ``PipeModelDataParallelTopology``.

What does not live here: the layout arithmetic (:mod:`.plan`), the world itself (:mod:`llmscale.dist`).
"""
from __future__ import annotations

import torch.distributed as dist

from llmscale.parallel.plan import Layout


class Topology:
    """DeepSpeed's ``PipelineParallelGrid`` over ``PipeModelDataParallelTopology`` for this layout.

    The grid is DeepSpeed's "mpu": its data-parallel group carries gradient reduction and ZeRO
    sharding, its slice (model) group carries the tensor-parallel collectives of our layers. Using the
    same object for TP-only and TP x PP is what makes the two compose (DeepSpeed's AutoTP builds its own
    groups, which do not line up with a PipelineModule's grid)."""

    def __init__(self, layout: Layout):
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

        self.layout = layout
        self.topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
        self.grid = PipelineParallelGrid(topology=self.topo)
        me = self.topo.get_coord(dist.get_rank())
        mine = layout.for_rank(dist.get_rank())
        assert (me.pipe, me.data, getattr(me, "model", 0)) == (mine.pp_rank, mine.dp_rank, mine.tp_rank), (me, mine)

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group()

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group()

    @property
    def pp_group(self):
        return self.grid.get_pipe_parallel_group()

    @property
    def model_group(self):
        """All ranks holding one model replica (pipe x tensor) — for the gradient norm."""
        return self.grid.get_model_parallel_group()
