"""The typed config of ``llmscale eval``: the same conventions as the training tree (every field documented,
unknown keys fail, dotted overrides).

    cfg = load_config(EvalConfig, "configs/eval_wikitext2.yaml", ["model=runs/quickstart", "batch_size=16"])

One job runs several ``tasks`` on one model; each task has its own section. Settings that change the
numbers (context, stride, masking seed, max_len, ...) are written into ``results.json`` beside them; the
ones that do not (``batch_size``, the number of processes) are recorded too, so a reader can check.

What does not live here: the tasks themselves (:mod:`llmscale.eval_tasks`), the job (:mod:`llmscale.jobs.eval`),
the training tree's machinery (:mod:`llmscale.config`, used here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from llmscale.config import doc
from llmscale.errors import ConfigError

TASKS = ("perplexity", "mlm", "nsp", "classify", "generate", "harness")


@dataclass
class TextInputs:
    """Held-out text: raw files (read as ``llmscale prepare`` reads them) or a split of a prepared dataset."""

    files: list[str] = doc(text="Raw text files, folders or globs (.txt, .jsonl, .json, .parquet, .csv, .tsv, .gz).",
                           factory=list)
    text_field: str = doc("text", "Column / JSON field holding the text of table and JSONL files.")
    doc_split: Literal["file", "chunk", "paragraph", "line"] = doc(
        "file", ".txt files: what one document is (file: the whole file, as the WikiText convention scores it).")
    dataset: str = doc("", "Instead of files: a folder written by `llmscale prepare` (its tokenizer must be the "
                           "model's).")
    split: Literal["val", "train"] = doc("val", "The split of `dataset` to score.")

    def check(self, task: str) -> None:
        if bool(self.files) == bool(self.dataset):
            raise ConfigError(f"{task}: give either {task}.files (raw text) or {task}.dataset (a prepared dataset), "
                              f"exactly one; got files={self.files} dataset={self.dataset!r}.")


@dataclass
class PerplexityConfig(TextInputs):
    """Sliding-window perplexity of a causal LM (see llmscale.scoring): every token scored exactly once."""

    context: int = doc(0, "Tokens the model sees per window (0 = the model's max_seq_len).")
    stride: int = doc(0, "New tokens scored per window after the first (0 = context: disjoint windows; smaller "
                         "gives each token more context).")
    word_perplexity: Optional[bool] = doc(
        None, "Also report exp(nats / words), words = whitespace-separated tokens + one per line end (the "
              "WikiText count); null (auto): unless the text is mostly CJK (no spaces between words).")


@dataclass
class MLMConfig(TextInputs):
    """Masked-LM loss and accuracy of a BERT on held-out text, with a fixed masking seed."""

    seq_len: int = doc(0, "Tokens per segment, [CLS] and [SEP] included (0 = min(128, the model's max_seq_len)); "
                          "each document is cut into consecutive segments, every token in exactly one.")
    mlm_probability: float = doc(0.15, "Fraction of tokens selected (80% [MASK], 10% random, 10% kept), as in "
                                       "training.")
    seed: int = doc(1234, "Masking seed: which tokens are masked depends only on it and the segment's index.")

    def validate(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm.mlm_probability must be in (0, 1), got {self.mlm_probability}.")


@dataclass
class NSPConfig:
    """Next-sentence-prediction accuracy of a BERT with an NSP head on a prepared BERT dataset's val split: the
    sentence pairs and 50% random next segments (from another document) of training's loader, with its seed."""

    dataset: str = doc("", "A BERT dataset written by `llmscale prepare --format bert` with the model's tokenizer.")
    seq_len: int = doc(0, "Tokens per pair, [CLS]/[SEP] included (0 = min(128, the model's max_seq_len)).")
    seed: int = doc(1234, "Seed of the pairs' A/B cut, the random next segments and the masking (as data.seed).")


@dataclass
class EvalClassifyConfig:
    """Classification metrics on labelled examples (the same file forms as `llmscale finetune`)."""

    files: list[str] = doc(text="Labelled files: .tsv/.csv/.jsonl, a folder-per-label root, a .tar.gz/.zip member.",
                           factory=list)
    split: str = doc("", "Folder-per-label layouts: the split folder to read (e.g. test).")
    text_field: str = doc("sentence", "Column / JSON field holding the text.")
    text_pair_field: str = doc("", "Column / field of a second text (sentence pairs); empty = none.")
    label_field: str = doc("label", "Column / field holding the gold label (every label must be in the model's "
                                    "label map).")
    max_len: int = doc(0, "Tokens per example (0 = the fine-tune run's classify.max_len, else the model's "
                          "max_seq_len); longer texts are truncated and counted.")
    truncation: Literal["", "head", "head_tail"] = doc("", "Empty: the fine-tune run's rule (else head).")


@dataclass
class GenerateConfig:
    """Completions for a file of prompts."""

    prompts: list[str] = doc(text="Prompt files: .txt (one prompt per line) or .jsonl (field `prompt_field`).",
                             factory=list)
    prompt_field: str = doc("prompt", "JSONL: the field holding the prompt.")
    reference_field: str = doc("", "JSONL: a field holding a reference completion, copied to predictions.jsonl.")
    max_new_tokens: int = doc(64, "Tokens generated per prompt at most (stops at eos).")
    greedy: bool = doc(True, "Take the most likely token (else sample with temperature/top_k/top_p).")
    temperature: float = doc(1.0, "Sampling temperature.")
    top_k: int = doc(0, "Sample among the k most likely tokens (0 = all).")
    top_p: float = doc(1.0, "Nucleus sampling mass (1 = all).")
    seed: int = doc(1234, "Sampling seed; prompt i uses seed + i, so results do not depend on the number of ranks.")

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"generate.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generate.top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or self.temperature < 0:
            raise ConfigError("generate.top_k and generate.temperature must be >= 0.")


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks (needs the `harness` extra: pip install 'llmscale[harness]')."""

    tasks: list[str] = doc(text="Task names (from include_path or the harness) or paths to task YAML files.",
                           factory=list)
    include_path: list[str] = doc(text="Extra folders of task YAMLs (configs/harness is always included).",
                                  factory=list)
    num_fewshot: int = doc(-1, "Few-shot examples (-1 = each task's default).")
    limit: int = doc(0, "Examples per task (0 = all).")
    seed: int = doc(1234, "Seed of the harness's few-shot sampling and generation.")


@dataclass
class EvalConfig:
    """The whole evaluation job."""

    model: str = doc("", "A pretraining or fine-tune run dir, a checkpoint of any layout, an llmscale or transformers "
                         "model folder.")
    checkpoint: Literal["auto", "best", "final", "latest"] = doc(
        "auto", "Which weights of a run dir: auto = best.json's checkpoint if the run has one (fine-tune runs), "
                "else final/model.pt, else the newest checkpoint.")
    tokenizer: str = doc("", "An llmscale tokenizer folder replacing the one that comes with the model.")
    output_dir: str = doc("runs/eval", "Where results.json, results.md and predictions.jsonl go.")
    tasks: list[str] = doc(text=f"Tasks to run, in order: {', '.join(TASKS)}.", factory=list)
    batch_size: int = doc(8, "Micro-batch per process (does not change the numbers).")
    device: str = doc("auto", "auto (cuda:LOCAL_RANK when there is a GPU, else cpu), cpu, cuda, ...")
    perplexity: PerplexityConfig = doc(text="task perplexity.", factory=PerplexityConfig)
    mlm: MLMConfig = doc(text="task mlm.", factory=MLMConfig)
    nsp: NSPConfig = doc(text="task nsp.", factory=NSPConfig)
    classify: EvalClassifyConfig = doc(text="task classify.", factory=EvalClassifyConfig)
    generate: GenerateConfig = doc(text="task generate.", factory=GenerateConfig)
    harness: HarnessConfig = doc(text="task harness.", factory=HarnessConfig)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model is empty: give the run dir, checkpoint or model folder to evaluate "
                              "(e.g. model=runs/quickstart).")
        if not self.tasks:
            raise ConfigError(f"tasks is empty: name at least one of {', '.join(TASKS)} (e.g. tasks=[perplexity]).")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"tasks {unknown} are unknown; choose among {', '.join(TASKS)}.")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks {self.tasks} names a task twice: each task runs once per job.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        p = self.perplexity
        if p.context < 0 or p.stride < 0 or (p.context and p.stride > p.context):
            raise ConfigError(f"perplexity.stride ({p.stride}) must be in [1, perplexity.context ({p.context})] "
                              f"(0 = defaults); context >= 0.")
        if "perplexity" in self.tasks:
            p.check("perplexity")
        if "mlm" in self.tasks:
            self.mlm.check("mlm")
            if self.mlm.seq_len and self.mlm.seq_len < 4:
                raise ConfigError(f"mlm.seq_len must be >= 4 (or 0), got {self.mlm.seq_len}.")
        if "nsp" in self.tasks and not self.nsp.dataset:
            raise ConfigError("task nsp needs nsp.dataset: a BERT dataset written by `llmscale prepare --format bert "
                              "--tokenizer MODEL_TOKENIZER ...` (its val split is scored).")
        if "classify" in self.tasks and not self.classify.files:
            raise ConfigError("task classify needs classify.files: labelled examples (e.g. "
                              "classify.files=[data/sst2/dev.tsv]).")
        if "generate" in self.tasks and not self.generate.prompts:
            raise ConfigError("task generate needs generate.prompts: a .txt (one prompt per line) or .jsonl file.")
        if "harness" in self.tasks and not self.harness.tasks:
            raise ConfigError("task harness needs harness.tasks: task names or YAML paths (e.g. "
                              "harness.tasks=[llmscale_mc]).")
