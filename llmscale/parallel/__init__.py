"""How a run is laid out over processes, and how a single-device model is split to fit that layout.

* :mod:`.plan` — torch-free: :func:`plan_run` (layout check + batch triad, once per run), :class:`Layout`,
  :class:`BatchPlan`, :func:`solve_batch`, :func:`check_layout`;
* :mod:`.topology` — DeepSpeed's process-group grid for a layout;
* :mod:`.tensor` — column/row-parallel linear layers and :func:`apply_tensor_parallel`;
* :mod:`.pipeline` — ``PipelineModule`` layers from a model's ``pipeline_layers()``.

All of it is used by :mod:`llmscale.engine`, the only module that talks to DeepSpeed's engine. Models
never import this package. Importing this package (and :mod:`.plan`) does not import torch.

What does not live here: the DeepSpeed config and engine (:mod:`llmscale.engine`), the world and its
collectives (:mod:`llmscale.dist`), the optimizer and step control (:mod:`llmscale.optim`).
"""
from llmscale.errors import LayoutError
from llmscale.parallel.plan import BatchPlan, Layout, RunPlan, check_layout, plan_run, solve_batch

__all__ = ["BatchPlan", "Layout", "LayoutError", "RunPlan", "check_layout", "plan_run", "solve_batch"]
