"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

Every section is a dataclass whose fields carry a one-line ``doc``. Loading is strict:
unknown keys, wrong types and inconsistent values raise :class:`ConfigError` naming the
key, what was given and what is accepted — before any work starts.

    cfg = load_config(RunConfig, "configs/quickstart.yaml", ["optim.lr=3e-4", "data.seq_len=512"])
    save_resolved(cfg, run_dir / "config.yaml")

A section may define ``validate(self)`` (cross-field checks, raise ConfigError) and a
static ``preset_defaults(raw: dict) -> dict`` returning base values that the raw mapping
overrides (used by ``model.preset``).
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from llmscale.errors import ConfigError


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a one-line description (shown by ``llmscale config show``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# --------------------------------------------------------------------------- sections


@dataclass
class BlendEntry:
    """One dataset in a weighted blend."""

    path: str = doc("", "Folder written by `llmscale prepare` (holds manifest.json).")
    weight: float = doc(1.0, "Relative sampling weight; weights are normalised to sum to 1.")

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("data.blend[].path is empty: give the folder written by `llmscale prepare`.")
        if not self.weight > 0:
            raise ConfigError(f"data.blend[].weight must be > 0, got {self.weight} for {self.path!r}.")


@dataclass
class DataConfig:
    """Where tokens come from and how they are batched."""

    path: str = doc("", "Dataset folder written by `llmscale prepare`; or use `blend` for several.")
    blend: list[BlendEntry] = doc(text="Several datasets with weights (instead of `path`).", factory=list)
    format: Literal["gpt", "bert"] = doc("gpt", "gpt: packed causal-LM windows; bert: masked-LM segments.")
    seq_len: int = doc(256, "Tokens per training sample.")
    mlm_probability: float = doc(0.15, "BERT: fraction of tokens selected for masking (80/10/10 rule).")
    nsp: bool = doc(False, "BERT: also build next-sentence-prediction pairs and labels.")
    seed: int = doc(1234, "Seed of the global sample order and of masking.")
    window_offsets: Literal["fixed", "epoch", "window"] = doc(
        "epoch", "GPT training windows: window j starts at j*seq_len + an offset in [0, seq_len). epoch: one random "
                 "offset per epoch and dataset (every token a target once per epoch but that epoch's first offset); "
                 "window: a random offset per window and epoch, as random-offset samplers (nanoGPT's) draw them "
                 "(tokens covered once per epoch on average: about 1/6 twice, 1/6 not); fixed: offset 0. A pure "
                 "function of the seed and the stream position. Validation is always fixed.")
    num_workers: int = doc(0, "Background batch-preparation threads per rank (0 = in the main thread).")

    def validate(self) -> None:
        if self.path and self.blend:
            raise ConfigError("data.path and data.blend are both set: use one (a blend of one is `path`).")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}.")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        if self.nsp and self.format != "bert":
            raise ConfigError("data.nsp=true needs data.format=bert (next-sentence prediction is a BERT task).")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}.")

    def sources(self) -> list[BlendEntry]:
        """The datasets to read, as a blend (a single `path` is a blend of one)."""
        if self.blend:
            return list(self.blend)
        return [BlendEntry(path=self.path, weight=1.0)] if self.path else []


@dataclass
class ModelConfig:
    """Architecture. `preset` fills every field you do not set yourself."""

    family: Literal["gpt", "bert", "lstm", "bilstm"] = doc(
        "gpt", "gpt: causal LM; bert: masked LM; lstm: baseline LM; bilstm: BiLSTM + self-attention classifier "
               "(fine-tuning only, from scratch; d_model = embedding width, d_model/2 units per direction).")
    preset: Optional[str] = doc(None, "Named preset (see `llmscale config presets`); explicit fields override it.")
    n_layers: int = doc(2, "Transformer blocks (or LSTM layers).")
    d_model: int = doc(128, "Hidden width.")
    n_heads: int = doc(4, "Attention heads.")
    n_kv_heads: Optional[int] = doc(None, "Key/value heads for grouped-query attention (default: n_heads).")
    d_ff: Optional[int] = doc(
        None, "MLP hidden width (default 4*d_model for GELU, multiple of 256 near 8/3*d_model for SwiGLU).")
    vocab_size: Optional[int] = doc(None, "Vocabulary size (default: taken from the dataset's tokenizer).")
    max_seq_len: int = doc(1024, "Longest sequence the model accepts (learned positions table size).")
    norm: Literal["layernorm", "rmsnorm"] = doc("layernorm", "Normalisation layer.")
    norm_eps: float = doc(1e-5, "Epsilon of the normalisation layers.")
    position: Literal["learned", "rope"] = doc("learned", "Learned absolute positions or rotary embeddings.")
    rope_theta: float = doc(10000.0, "RoPE base frequency.")
    activation: Literal["gelu", "swiglu"] = doc("gelu", "MLP activation.")
    bias: bool = doc(True, "Biases in linear layers and norms.")
    dropout: float = doc(0.0, "Dropout on embeddings, attention and residual branches.")
    tie_embeddings: bool = doc(True, "Share the token embedding with the output head.")
    norm_position: Literal["pre", "post"] = doc("pre", "pre-norm (GPT) or post-norm (original BERT) blocks.")
    type_vocab_size: int = doc(2, "BERT: number of token types (segments).")
    nsp_head: bool = doc(False, "BERT: add the next-sentence-prediction head.")
    init_std: float = doc(0.02, "Std of the normal initialisation; residual projections get std/sqrt(2*n_layers).")
    activation_checkpointing: bool = doc(False, "Recompute each block's activations in backward to save memory.")

    @staticmethod
    def preset_defaults(raw: dict) -> dict:
        name = raw.get("preset")
        if not name:
            return {}
        from llmscale.models.presets import CLASSIFIER_PRESETS, PRESETS  # local: keeps config import light

        known = {**PRESETS, **CLASSIFIER_PRESETS}
        if name not in known:
            raise ConfigError(f"model.preset={name!r} is unknown. Choose one of: {', '.join(sorted(known))}.")
        return dict(known[name])

    def validate(self) -> None:
        for k in ("n_layers", "d_model", "n_heads", "max_seq_len"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k} must be >= 1, got {getattr(self, k)}.")
        if self.family == "bilstm" and self.d_model % 2:
            raise ConfigError(f"model.d_model={self.d_model} must be even for family=bilstm (d_model/2 hidden units "
                              f"per direction); use {self.d_model + 1}.")
        if self.family not in ("lstm", "bilstm") and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads among {[h for h in range(1, self.d_model + 1) if self.d_model % h == 0][-6:]}."
            )
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={kv}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}.")
        if self.family == "bert" and self.position == "rope":
            raise ConfigError("model.position=rope is not supported for family=bert (BERT uses learned positions).")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = doc(3e-4, "Peak learning rate.")
    min_lr: float = doc(3e-5, "Learning rate at the end of the decay.")
    weight_decay: float = doc(0.1, "Decoupled weight decay (never applied to norms and biases; to embeddings only "
                                   "with decay_embeddings).")
    decay_embeddings: bool = doc(False, "Also decay embedding matrices (and a head tied to one), as nanoGPT does.")
    beta1: float = doc(0.9, "AdamW beta1.")
    beta2: float = doc(0.95, "AdamW beta2.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this (0 = off).")
    warmup_steps: int = doc(100, "Linear warm-up steps from 0 to `lr`.")
    schedule: Literal["cosine", "linear", "constant"] = doc("cosine", "Decay after warm-up.")
    decay_steps: Optional[int] = doc(None, "Step at which `min_lr` is reached (default: train.steps).")

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}.")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"optim.{k} must be in [0, 1), got {getattr(self, k)}.")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}.")


@dataclass
class ParallelConfig:
    """Parallel layout and batch arithmetic. Give any two of micro_batch_size, grad_accum_steps and
    global_batch_size (or global_batch_tokens); the third is solved from the world size."""

    zero_stage: int = doc(0, "DeepSpeed ZeRO stage 0, 1, 2 or 3 (data-parallel sharding).")
    offload_optimizer: bool = doc(False, "ZeRO: keep optimizer state on the CPU.")
    tensor_parallel: int = doc(1, "Tensor-parallel degree.")
    pipeline_parallel: int = doc(1, "Pipeline-parallel degree (stages).")
    pipeline_partition: Literal["parameters", "uniform"] = doc(
        "parameters", "How layers are assigned to pipeline stages: balance parameter counts, or equal layer counts.")
    micro_batch_size: Optional[int] = doc(None, "Samples per rank per forward pass.")
    grad_accum_steps: Optional[int] = doc(
        None, "Micro-batches accumulated per optimizer step (pipeline: micro-batches per step).")
    global_batch_size: Optional[int] = doc(None, "Samples per optimizer step over all data-parallel ranks.")
    global_batch_tokens: Optional[int] = doc(
        None, "Alternative to global_batch_size: tokens per step (divided by data.seq_len).")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}.")
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ConfigError("parallel.tensor_parallel and parallel.pipeline_parallel must be >= 1.")
        if self.global_batch_size is not None and self.global_batch_tokens is not None:
            raise ConfigError("Give parallel.global_batch_size or parallel.global_batch_tokens, not both.")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer=true needs parallel.zero_stage >= 1 (ZeRO-Offload).")
        for k in ("micro_batch_size", "grad_accum_steps", "global_batch_size", "global_batch_tokens"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"parallel.{k} must be >= 1, got {v}.")


@dataclass
class DeepSpeedExtra:
    """Extra DeepSpeed settings, typed. Each maps to one key of the generated DeepSpeed config."""

    overlap_comm: Optional[bool] = doc(None, "zero_optimization.overlap_comm")
    contiguous_gradients: Optional[bool] = doc(None, "zero_optimization.contiguous_gradients")
    reduce_bucket_size: Optional[int] = doc(None, "zero_optimization.reduce_bucket_size (elements)")
    allgather_bucket_size: Optional[int] = doc(None, "zero_optimization.allgather_bucket_size (elements)")
    stage3_prefetch_bucket_size: Optional[int] = doc(None, "zero_optimization.stage3_prefetch_bucket_size")
    stage3_param_persistence_threshold: Optional[int] = doc(
        None, "zero_optimization.stage3_param_persistence_threshold")
    communication_data_type: Optional[Literal["fp32", "fp16", "bf16"]] = doc(None, "communication_data_type")
    wall_clock_breakdown: bool = doc(False, "wall_clock_breakdown: DeepSpeed's own forward/backward/step timers.")
    steps_per_print: int = doc(1_000_000, "steps_per_print (llmscale does its own logging).")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = doc(1000, "Optimizer steps to run.")
    seed: int = doc(1234, "Seed of model initialisation and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc("auto", "auto: bf16 on GPUs that support it, fp32 on CPU.")
    compile: bool = doc(False, "torch.compile the model.")
    log_every: int = doc(10, "Log metrics every N steps.")
    eval_every: int = doc(200, "Validate every N steps (0 = only at the end).")
    eval_batches: int = doc(20, "Validation micro-batches per evaluation.")
    tensorboard: bool = doc(True, "Also write TensorBoard event files under RUN_DIR/tb.")
    log_all_ranks: bool = doc(False, "Log from every rank, not only rank 0.")
    nan_policy: Literal["skip", "raise"] = doc(
        "skip", "On a non-finite loss or grad norm: skip the step on every rank, or stop.")
    max_bad_steps: int = doc(3, "Roll back to the last checkpoint after this many bad steps in a row (0 = never).")
    wait_timeout_s: float = doc(
        600.0, "Longest a rank waits for the others inside a checkpoint save, a resume (rank 0's conversion of a "
        "checkpoint of another layout included: `llmscale ckpt convert` does it beforehand) or an evaluation "
        "batch. Past it the rank names what it waited for and exits 1, instead of hanging until the process "
        "group's timeout (30 min). 0 = no bound.")

    peer_timeout_s: float = doc(
        120.0, "A rank whose heartbeat has not moved for this long is lost (its node died, or it hangs outside "
        "Python): every other rank names it and exits 76 (slurm/*.sbatch requeue; the run resumes from the last "
        "checkpoint). Detected by a monitor thread (llmscale.dist.PeerMonitor). 0 = off.")

    def validate(self) -> None:
        if self.peer_timeout_s < 0:
            raise ConfigError(f"train.peer_timeout_s must be >= 0 (0 = off), got {self.peer_timeout_s}.")
        if self.wait_timeout_s < 0:
            raise ConfigError(f"train.wait_timeout_s must be >= 0 (0 = no bound), got {self.wait_timeout_s}.")
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}.")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}.")
        if self.eval_every < 0 or self.eval_batches < 0:
            raise ConfigError("train.eval_every and train.eval_batches must be >= 0.")


@dataclass
class CheckpointConfig:
    """Sharded, atomic checkpoints and auto-resume."""

    every_steps: int = doc(0, "Save every N steps (0 = off).")
    every_minutes: float = doc(0.0, "Save every T minutes of wall time (0 = off).")
    keep_last: int = doc(3, "Keep the newest K complete checkpoints.")
    keep_every: int = doc(0, "Also keep every checkpoint whose step is a multiple of M, forever (0 = off).")
    save_at_end: bool = doc(True, "Save when training finishes.")
    async_: bool = doc(False, "Asynchronous save (YAML key `async`): snapshot to host memory at the step, write, hash "
                              "and fsync in the background; manifest, rename and `latest` once every rank is done. "
                              "Preemption and the end of training wait for it.")
    async_failure: Literal["stop", "sync"] = doc(
        "stop", "A failed background write (reported on every rank at the next step): stop the run, or save that step "
                "again synchronously and go on.")

    def validate(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0 or self.keep_every < 0:
            raise ConfigError("checkpoint.every_steps, every_minutes and keep_every must be >= 0.")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1 (the newest is never removed), got {self.keep_last}.")


@dataclass
class RunConfig:
    """Everything `llmscale train` needs."""

    run_dir: str = doc("runs/default", "Output folder: checkpoints, metrics, resolved config. Re-running resumes.")
    data: DataConfig = doc(text="Data.", factory=DataConfig)
    model: ModelConfig = doc(text="Model.", factory=ModelConfig)
    optim: OptimConfig = doc(text="Optimizer.", factory=OptimConfig)
    parallel: ParallelConfig = doc(text="Parallel layout and batch sizes.", factory=ParallelConfig)
    train: TrainConfig = doc(text="Training loop.", factory=TrainConfig)
    checkpoint: CheckpointConfig = doc(text="Checkpoints.", factory=CheckpointConfig)
    deepspeed: DeepSpeedExtra = doc(text="Typed extra DeepSpeed keys.", factory=DeepSpeedExtra)

    def validate(self) -> None:
        if self.data.format == "bert" and self.model.family != "bert":
            raise ConfigError(f"data.format=bert needs model.family=bert (got {self.model.family!r}).")
        if self.data.format == "gpt" and self.model.family == "bert":
            raise ConfigError("model.family=bert needs data.format=bert (masked-LM batches).")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}: "
                f"lower data.seq_len or raise model.max_seq_len."
            )
        if self.model.nsp_head and not self.data.nsp:
            raise ConfigError("model.nsp_head=true needs data.nsp=true (labels for next-sentence prediction).")
        if self.data.nsp and not self.model.nsp_head:
            raise ConfigError("data.nsp=true needs model.nsp_head=true: without the head the next-sentence labels have "
                              "nothing to train (the step would fail, or a pipeline would drop the NSP loss silently). "
                              "Set model.nsp_head=true, or data.nsp=false for masked-LM only.")


# --------------------------------------------------------------------------- machinery

_T = typing.TypeVar("_T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}={value!r} is not allowed. Choose one of: {', '.join(map(str, choices))}.")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {_type_name(item_tp)}, got {value!r}.")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}.")
        return _from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _fail_int(key, value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}.")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r} (a bug in llmscale's config tree).")


def _fail_int(key: str, value: Any) -> int:
    raise ConfigError(f"{key} must be an integer, got {value!r}.")


def config_key(name: str) -> str:
    """The config key of a field: its name, except that ``from_`` (a Python keyword plus ``_``) is ``from``."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _from_dict(cls: type[_T], raw: dict, prefix: str = "") -> _T:
    hints = typing.get_type_hints(cls)
    fields = {config_key(f.name): f for f in dataclasses.fields(cls)}
    base = cls.preset_defaults(raw) if hasattr(cls, "preset_defaults") else {}
    merged = {**base, **raw}
    kwargs = {}
    for k, v in merged.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            near = difflib.get_close_matches(str(k), list(fields), n=3)
            hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            raise ConfigError(
                f"Unknown config key {key!r}.{hint} Valid keys here: {', '.join(sorted(fields))}."
            )
        kwargs[fields[k].name] = _coerce(v, hints[fields[k].name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a field without default missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _validate_tree(obj: Any) -> None:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                _validate_tree(v)
            elif isinstance(v, list):
                for item in v:
                    _validate_tree(item)
        if hasattr(obj, "validate"):
            obj.validate()


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=3e-4", "data.blend=[{path: a}]"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. optim.lr=3e-4).")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"Override {item!r} has an empty key part.")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"Override {item!r}: the value is not valid YAML ({e}).") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"Override {item!r} conflicts with an earlier override of {part!r}.")
            node = nxt
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {str(p)!r} does not exist. Configs shipped with llmscale are in configs/.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}.")
    return data


def from_dict(cls: type[_T], raw: dict, *, validate: bool = True) -> _T:
    """Build and (by default) validate a config tree from a plain mapping."""
    cfg = _from_dict(cls, raw)
    if validate:
        _validate_tree(cfg)
    return cfg


def load_config(cls: type[_T], path: str | Path | None = None, overrides: list[str] | None = None) -> _T:
    """YAML file (optional) + dotted overrides -> validated config of type ``cls``. A run or fine-tune config
    (one with a ``parallel`` section) also takes what ``accelerate launch --config_file`` passed where it leaves
    a setting unset, and refuses a disagreement (:mod:`llmscale.launcher_settings`)."""
    raw = read_yaml(path) if path else {}
    raw = _deep_merge(raw, parse_overrides(overrides or []))
    if dataclasses.is_dataclass(cls) and "parallel" in {f.name for f in dataclasses.fields(cls)}:
        from llmscale.launcher_settings import merge_launcher_settings

        raw = merge_launcher_settings(raw)
    return from_dict(cls, raw)


def to_dict(cfg: Any) -> Any:
    """The config tree as plain data, keyed as in YAML (see :func:`config_key`)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {config_key(f.name): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def save_resolved(cfg: Any, path: str | Path) -> Path:
    """Write the fully resolved config next to the output it produced (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(p)
    return p


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field: the reference behind `llmscale config show`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{config_key(f.name)}" if prefix else config_key(f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), repr(default), f.metadata.get("doc", "")))
    return rows
