"""The typed config of ``llmscale finetune``: the same conventions as the pretraining tree (every field
documented, unknown keys fail, dotted overrides), and the same ``model`` / ``optim`` / ``parallel`` /
``checkpoint`` / ``deepspeed`` sections, so the engine and the checkpoints work unchanged.

    cfg = load_config(FinetuneConfig, "configs/finetune_sst2_bert.yaml", ["optim.lr=3e-5"])

What a fine-tune adds: where the initial weights come from (``init``), the task (``classify``, ``sft`` or
``lm``) with its data section, and early stopping (``train.patience`` on ``train.metric``).

What does not live here: the pretraining tree (:mod:`llmscale.config`, whose machinery this module uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmscale.config import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedExtra,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    doc,
)
from llmscale.errors import ConfigError


@dataclass
class InitConfig:
    """Where the weights of step 0 come from (weights only: the optimizer and schedule start afresh)."""

    from_: str = doc("scratch", "A pretraining run dir, a checkpoint of any layout, an llmscale model folder, a "
                                "transformers folder, or `scratch` (model.* with random weights).")
    tokenizer: str = doc("", "llmscale tokenizer folder: needed with from=scratch; otherwise it replaces the one "
                             "that comes with the weights (e.g. a transformers folder without an llmscale one).")


@dataclass
class ClassifyConfig:
    """task=classify: text (or text pair) -> one of N labels."""

    train: list[str] = doc(text="Training files: .tsv/.csv/.jsonl, a folder-per-label root, or a .tar.gz/.zip "
                                "member (see llmscale.data.finetune).", factory=list)
    val: list[str] = doc(text="Validation files, same forms as `train` (empty: no validation).", factory=list)
    split: str = doc("", "Folder-per-label layouts: the split folder to read for training (e.g. train).")
    val_split: str = doc("", "Folder-per-label layouts: the split folder to read for validation (e.g. test).")
    text_field: str = doc("sentence", "Column / JSON field holding the text.")
    text_pair_field: str = doc("", "Column / field of a second text (sentence pairs); empty = none.")
    label_field: str = doc("label", "Column / field holding the label.")
    labels: list[str] = doc(text="Label names in class order (empty: the sorted labels of the training data).",
                            factory=list)
    max_len: int = doc(128, "Tokens per example, special tokens included; longer texts are truncated (counted).")
    truncation: Literal["head", "head_tail"] = doc("head", "Keep the first tokens, or the first and last ones.")
    pooling: Literal["auto", "cls_pooler", "cls", "mean", "last", "attention"] = doc(
        "auto", "auto: cls_pooler for BERT, last for GPT, attention for the BiLSTM.")
    class_weights: list[float] = doc(text="Loss weight per class, in label order (empty: all 1).", factory=list)
    dropout: float = doc(0.1, "Dropout before the classifier layer.")

    def validate(self) -> None:
        if self.max_len < 4:
            raise ConfigError(f"classify.max_len must be >= 4, got {self.max_len}.")
        if self.class_weights and any(not w > 0 for w in self.class_weights):
            raise ConfigError("classify.class_weights must all be > 0.")
        if self.class_weights and self.labels and len(self.class_weights) != len(self.labels):
            raise ConfigError(f"classify.class_weights has {len(self.class_weights)} entries for "
                              f"{len(self.labels)} classify.labels: give one weight per label.")


@dataclass
class SFTConfig:
    """task=sft: supervised fine-tuning of a causal LM on prompt/response pairs (JSONL)."""

    train: list[str] = doc(text="Training files (.jsonl, optionally .gz or a .zip member).", factory=list)
    val: list[str] = doc(text="Validation files (empty: no validation).", factory=list)
    prompt_field: str = doc("prompt", "JSON field holding the prompt (dotted names reach nested objects).")
    response_field: str = doc("response", "JSON field holding the response.")
    template: str = doc("", "Chat template with {prompt} then {response}, e.g. 'User: {prompt}\\nBot: {response}'; "
                            "all before {response} is prompt (no loss). Empty: prompt and response as they are.")
    max_len: int = doc(256, "Tokens per row; longer examples are cut from the right (counted; no target left: "
                            "dropped and counted).")
    packing: bool = doc(False, "Pack several examples per row (attention and positions restart per example).")

    def validate(self) -> None:
        if self.max_len < 4:
            raise ConfigError(f"sft.max_len must be >= 4, got {self.max_len}.")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The fine-tuning loop: the pretraining loop's fields (other defaults where fine-tuning wants them), plus
    the metric that picks the best checkpoint and early stopping."""

    eval_every: int = doc(100, "Validate every N steps (0 = only at the end).")
    eval_batches: int = doc(0, "Validation micro-batches per rank and evaluation (0 = the whole validation set; "
                               "fewer: a fixed random sample of it).")
    metric: Literal["auto", "accuracy", "f1", "loss"] = doc(
        "auto", "Validation metric that picks the best checkpoint (auto: accuracy for classify, loss otherwise).")
    patience: int = doc(0, "Stop after this many validations without a better metric (0 = never stop early).")

    def validate(self) -> None:
        super().validate()
        if self.patience < 0:
            raise ConfigError(f"train.patience must be >= 0, got {self.patience}.")


@dataclass
class FinetuneConfig:
    """The whole fine-tuning run."""

    run_dir: str = doc("runs/finetune", "Output folder: resolved config, metrics, checkpoints, best, export.")
    task: Literal["classify", "sft", "lm"] = doc(
        "classify", "classify: text classification; sft: prompt/response pairs (causal LM); lm: continued "
                    "pretraining on a prepared dataset (data.path).")
    init: InitConfig = doc(text="Initial weights.", factory=InitConfig)
    model: ModelConfig = doc(text="Architecture for from=scratch (else taken from the weights).", factory=ModelConfig)
    classify: ClassifyConfig = doc(text="task=classify.", factory=ClassifyConfig)
    sft: SFTConfig = doc(text="task=sft.", factory=SFTConfig)
    data: DataConfig = doc(text="task=lm: the prepared dataset; other tasks: data.seq_len is set from their max_len.",
                           factory=DataConfig)
    optim: OptimConfig = doc(text="Optimizer and schedule.", factory=OptimConfig)
    parallel: ParallelConfig = doc(text="Layout and batch sizes (data parallel; ZeRO 0-3).", factory=ParallelConfig)
    train: FinetuneTrainConfig = doc(text="Fine-tuning loop.", factory=FinetuneTrainConfig)
    checkpoint: CheckpointConfig = doc(text="Checkpoints.", factory=CheckpointConfig)
    deepspeed: DeepSpeedExtra = doc(text="Typed extra DeepSpeed keys.", factory=DeepSpeedExtra)

    def validate(self) -> None:
        if self.task == "classify" and not self.classify.train:
            raise ConfigError("task=classify needs classify.train: the training files (e.g. "
                              "classify.train=[data/sst2/train.tsv]).")
        if self.task == "sft" and not self.sft.train:
            raise ConfigError("task=sft needs sft.train: JSONL files of prompt/response pairs (e.g. "
                              "sft.train=[data/pairs.jsonl]).")
        if self.task == "lm" and not self.data.sources():
            raise ConfigError("task=lm needs data.path: a dataset written by `llmscale prepare` with the tokenizer of "
                              "init.from.")
        if self.parallel.pipeline_parallel > 1 or self.parallel.tensor_parallel > 1:
            raise ConfigError(
                f"llmscale finetune runs data parallel (any ZeRO stage 0-3); got tensor_parallel="
                f"{self.parallel.tensor_parallel} pipeline_parallel={self.parallel.pipeline_parallel}. Set "
                f"parallel.tensor_parallel=1 parallel.pipeline_parallel=1 (a checkpoint of any layout still loads).")
        if self.train.metric in ("accuracy", "f1") and self.task != "classify":
            raise ConfigError(f"train.metric={self.train.metric} needs task=classify; use train.metric=loss (or auto).")

    @property
    def metric_key(self) -> str:
        """The key of the validation dict that picks the best checkpoint."""
        m = self.train.metric
        if m == "auto":
            m = "accuracy" if self.task == "classify" else "loss"
        return "val_loss" if m == "loss" else m


_AUTO_POOLING = {"bert": "cls_pooler", "gpt": "last", "bilstm": "attention"}


def resolve_pooling(pooling: str, family: str) -> str:
    """``classify.pooling`` for a backbone of ``family``: ``auto`` picks cls_pooler / last / attention."""
    if pooling != "auto":
        return pooling
    if family not in _AUTO_POOLING:
        raise ConfigError(f"model.family={family!r} has no classifier: fine-tune a bert or gpt model, or train "
                          f"model.family=bilstm from scratch (init.from=scratch).")
    return _AUTO_POOLING[family]


def classifier_config(cfg: FinetuneConfig):
    """The :class:`llmscale.models.classify.ClassifierConfig` of a resolved run config (labels and pooling set
    by the job before it saves the config, so a checkpoint rebuilds the same head)."""
    from llmscale.models.classify import ClassifierConfig

    c = cfg.classify
    return ClassifierConfig(num_labels=len(c.labels), pooling=resolve_pooling(c.pooling, cfg.model.family),
                            labels=list(c.labels), class_weights=list(c.class_weights) or None, dropout=c.dropout)


def build_finetuned_model(cfg: FinetuneConfig):
    """The single-device module a fine-tune run trains (random weights): the classifier of task=classify, the
    causal or masked LM itself for sft / lm. For rebuilding a saved run or checkpoint before its weights load."""
    if cfg.task == "classify":
        from llmscale.models.classify import SequenceClassifier

        return SequenceClassifier.from_config(cfg.model, classifier_config(cfg), vocab_size=cfg.model.vocab_size)
    from llmscale.models import build_model

    return build_model(cfg.model, vocab_size=cfg.model.vocab_size)
