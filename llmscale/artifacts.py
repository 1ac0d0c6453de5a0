"""What a run leaves on disk, by name, and one way to load a model from any of it.

The run directory (``run_dir`` of the config) holds::

    RUN_DIR/config.yaml              the resolved run config            (CONFIG_FILE)
    RUN_DIR/tokenizer/               the dataset's tokenizer, copied    (RUN_TOKENIZER; TOKENIZER_META inside)
    RUN_DIR/metrics.jsonl            one JSON record per log line        (METRICS_FILE)
    RUN_DIR/tb/                      TensorBoard events                  (TB_DIR)
    RUN_DIR/checkpoints/             sharded checkpoints                 (CHECKPOINTS; see llmscale.checkpoint)
    RUN_DIR/final/model.pt           consolidated weights at the end     (FINAL_DIR / FINAL_WEIGHTS)
    RUN_DIR/PREEMPTED                present while the run stopped on a preemption signal after saving
                                     (PREEMPTED_FILE; see mark_preempted)

:func:`load_model` accepts every kind of model source a job is pointed at and returns a
:class:`LoadedModel` (model in eval mode, tokenizer, configs):

* a finished run directory (``final/model.pt``);
* a run directory without final weights, its ``checkpoints/`` folder, or one checkpoint folder, of any
  parallel layout (consolidated without DeepSpeed: :mod:`llmscale.checkpoint.consolidate`);
* an llmscale model folder (``llmscale export`` / ``llmscale import`` output);
* a plain transformers GPT-2 / Llama / BERT folder (its own tokenizer through :class:`HFTokenizer`).

What does not live here: writing checkpoints (:mod:`llmscale.checkpoint`), converting to and from
transformers (:mod:`llmscale.models.hf`).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from llmscale.checkpoint.store import CHECKPOINTS, resolve_checkpoint
from llmscale.errors import ExportError
from llmscale.log import get_logger

log = get_logger(__name__)

CONFIG_FILE = "config.yaml"
RUN_TOKENIZER = "tokenizer"
TOKENIZER_META = "tokenizer_meta.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
FINAL_DIR = "final"
FINAL_WEIGHTS = "model.pt"

__all__ = ["CHECKPOINTS", "CONFIG_FILE", "FINAL_DIR", "FINAL_WEIGHTS", "METRICS_FILE", "RUN_TOKENIZER", "TB_DIR",
           "TOKENIZER_META", "HFTokenizer", "LoadedModel", "TextTokenizer", "final_weights_path", "is_finished_run",
           "load_model", "read_tokenizer_meta", "select_weights", "record_tokenizer", "save_final_weights",
           "write_final_weights"]


# --------------------------------------------------------------------------- the run directory


PREEMPTED_FILE = "PREEMPTED"
# Also written to the file this variable names, when set: how launch/torchrun.sh and launch/accelerate.sh learn
# that the ranks stopped for preemption, since torchrun and accelerate turn a rank's exit code 75 into their own 1.
PREEMPTED_ENV = "LLMSCALE_PREEMPTED_FILE"


def mark_preempted(run_dir: str | Path, *, step: int) -> list[Path]:
    """The durable sign that the run saved on a preemption signal and wants to be run again (exit code 75 is
    not passed through by torchrun or accelerate). Every rank writes it, atomically and with the same content,
    before it leaves the training loop: whichever rank exits first, the sign is already there when the launcher
    looks. Returns the paths written."""
    from llmscale.files import atomic_write_text
    from llmscale.signals import EXIT_REQUEUE

    text = json.dumps({"step": int(step), "exit_code": EXIT_REQUEUE,
                       "meaning": "saved on a preemption signal: run the same command again to resume"}) + "\n"
    paths = [Path(run_dir) / PREEMPTED_FILE]
    extra = os.environ.get(PREEMPTED_ENV)
    if extra:
        paths.append(Path(extra))
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, text)
    return paths


def clear_preempted(run_dir: str | Path) -> None:
    """Remove RUN_DIR/PREEMPTED (a run that starts again is no longer preempted)."""
    (Path(run_dir) / PREEMPTED_FILE).unlink(missing_ok=True)


def final_weights_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / FINAL_DIR / FINAL_WEIGHTS


def is_finished_run(p: str | Path) -> bool:
    p = Path(p)
    return (p / CONFIG_FILE).is_file() and final_weights_path(p).is_file()


def read_tokenizer_meta(tok_dir: str | Path) -> dict:
    """``tokenizer_meta.json`` of a tokenizer folder (hash, vocab size, ...), {} when absent or unreadable."""
    meta = Path(tok_dir) / TOKENIZER_META
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def record_tokenizer(run_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    """Copy a dataset's tokenizer into RUN_DIR/tokenizer (atomically, once), for resume checks and sampling."""
    run_dir = Path(run_dir)
    dst = run_dir / RUN_TOKENIZER
    if read_tokenizer_meta(dst):
        return dst
    tmp = run_dir / f".{RUN_TOKENIZER}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tokenizer_dir, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def write_final_weights(run_dir: str | Path, state: dict) -> Path:
    """RUN_DIR/final/model.pt (a plain tensor state dict), written to a temporary name and renamed."""
    import torch

    out = final_weights_path(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{FINAL_WEIGHTS}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out


def save_final_weights(engine: Any, run_dir: str | Path, *, is_main: bool) -> Optional[Path]:
    """Collective: the engine's consolidated single-device weights to RUN_DIR/final/model.pt, written by the
    main rank (which gets the path; the others None)."""
    state = engine.full_state_dict()  # every rank takes part; the weights land on rank 0
    if not is_main:
        return None
    path = write_final_weights(run_dir, state)
    log.info("final weights written to %s", path)
    return path


# --------------------------------------------------------------------------- tokenizers


class TextTokenizer(Protocol):
    """What the jobs need from a tokenizer (llmscale's Tokenizer has it; HFTokenizer wraps transformers')."""

    eos_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A transformers tokenizer seen through llmscale's encode/decode (for imported folders whose tokenizer
    is not an llmscale SentencePiece model, e.g. GPT-2's byte-level BPE). No special tokens are added."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.eos_id = self.hf.eos_token_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------- loading a model


@dataclass
class LoadedModel:
    """A model loaded by :func:`load_model`.

    ``config``: the resolved ModelConfig; ``run_config``: the RunConfig when the source is a run or a
    checkpoint (None for model folders); ``tokenizer_dir``: the llmscale tokenizer folder, if the source
    carries one; ``tokenizer``: an llmscale Tokenizer, an :class:`HFTokenizer`, or None; ``kind``: one of
    "run", "checkpoint", "model_folder"; ``path``: the file or folder the weights came from; ``classifier``:
    the head's ClassifierConfig when the model is a sequence classifier (``model.config`` is then its
    backbone's ModelConfig)."""

    model: Any
    config: Any
    tokenizer: Optional[TextTokenizer]
    tokenizer_dir: Optional[Path]
    kind: str
    path: Path
    run_config: Any = None
    classifier: Any = None  # the ClassifierConfig of a SequenceClassifier (fine-tuned runs and their exports)

    def require_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise ExportError(f"{self.path} has no tokenizer (neither tokenizer/ nor tokenizer.json): re-export it "
                              f"with `llmscale export SOURCE OUT --tokenizer TOKENIZER_DIR`.")
        return self.tokenizer


def _tokenizer_of(tok_dir: Optional[Path], folder: Optional[Path]) -> Optional[TextTokenizer]:
    from llmscale.data.tokenizer import Tokenizer

    if tok_dir is not None:
        return Tokenizer.load(tok_dir)
    if folder is not None and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return HFTokenizer(folder)
    return None


def _run_tokenizer_dir(run_dir: Path) -> Optional[Path]:
    tok = run_dir / RUN_TOKENIZER
    return tok if read_tokenizer_meta(tok) else None


def _load_final(run_dir: Path, device: str) -> LoadedModel:
    import torch

    from llmscale.config import RunConfig, from_dict, read_yaml
    from llmscale.models import build_model

    raw = read_yaml(run_dir / CONFIG_FILE)
    if "task" in raw:  # a fine-tuning run
        from llmscale.config_finetune import FinetuneConfig, build_finetuned_model

        cfg = from_dict(FinetuneConfig, raw)
        model = build_finetuned_model(cfg)
    else:
        cfg = from_dict(RunConfig, raw)
        model = build_model(cfg.model, vocab_size=cfg.model.vocab_size)
    model.load_state_dict(torch.load(final_weights_path(run_dir), map_location="cpu", weights_only=True))
    model.to(device).eval()
    tok_dir = _run_tokenizer_dir(run_dir)
    return LoadedModel(model=model, config=model.config, tokenizer=_tokenizer_of(tok_dir, None),
                       tokenizer_dir=tok_dir, kind="run", path=final_weights_path(run_dir), run_config=cfg,
                       classifier=getattr(model, "clf_config", None))


WEIGHTS_CHOICES = ("auto", "best", "final", "latest")


def select_weights(source: str | Path, which: str = "auto") -> Path:
    """The folder to load for SOURCE when it is a run directory: ``best`` (the checkpoint named by
    ``checkpoints/best.json``, a fine-tune run's best validation), ``final`` (``final/model.pt``: the run dir
    itself), ``latest`` (the newest complete checkpoint), or ``auto`` (best if recorded, else final, else
    latest). Any other source is returned as it is."""
    from llmscale.checkpoint.store import read_best

    if which not in WEIGHTS_CHOICES:
        raise ExportError(f"weights {which!r} is unknown; choose one of {', '.join(WEIGHTS_CHOICES)}.")
    p = Path(source)
    if not (p.is_dir() and (p / CONFIG_FILE).is_file()):
        return p
    best = read_best(p) if which in ("auto", "best") else None
    if best is not None:
        ckpt = p / CHECKPOINTS / str(best["name"])
        if resolve_checkpoint(ckpt) is None:
            raise ExportError(f"{p}/{CHECKPOINTS}/best.json names {best['name']}, which is missing or incomplete: "
                              f"evaluate checkpoint=final or checkpoint=latest instead.")
        return ckpt
    if which == "best":
        raise ExportError(f"{p} records no best checkpoint (checkpoints/best.json is written by `llmscale finetune` "
                          f"runs that validate): use checkpoint=final or checkpoint=latest.")
    if which == "final" and not is_finished_run(p):
        raise ExportError(f"{p} has no {FINAL_DIR}/{FINAL_WEIGHTS} (the run did not finish): use checkpoint=latest.")
    if which == "latest":
        ckpt = resolve_checkpoint(p)
        if ckpt is None:
            raise ExportError(f"{p} holds no complete checkpoint (`llmscale ckpt list {p}`).")
        return ckpt
    return p


def load_model(source: str | Path, *, device: str = "cpu") -> LoadedModel:
    """The model (eval mode, on ``device``), its tokenizer and configs from SOURCE, any kind listed in the
    module doc. A run directory with final weights loads those; without, its newest complete checkpoint."""
    from llmscale.models.hf import LLMSCALE_CONFIG, llmscale_tokenizer_dir, load_model_folder
    from llmscale.models.hf_classify import CLASSIFIER_CONFIG, load_classifier_folder

    p = Path(source)
    if not p.exists():
        raise ExportError(f"{source} does not exist: give a model folder (`llmscale export` / `llmscale import` "
                          f"output), a run directory or a checkpoint.")
    if p.is_dir() and (p / CLASSIFIER_CONFIG).is_file():
        model, cfg, clf = load_classifier_folder(p, device=device)
        tok_dir = llmscale_tokenizer_dir(p)
        return LoadedModel(model=model, config=cfg, tokenizer=_tokenizer_of(tok_dir, p), tokenizer_dir=tok_dir,
                           kind="model_folder", path=p, classifier=clf)
    if p.is_dir() and ((p / LLMSCALE_CONFIG).is_file() or (p / "config.json").is_file()):
        model, cfg = load_model_folder(p, device=device)
        tok_dir = llmscale_tokenizer_dir(p)
        return LoadedModel(model=model, config=cfg, tokenizer=_tokenizer_of(tok_dir, p), tokenizer_dir=tok_dir,
                           kind="model_folder", path=p)
    if p.is_dir() and is_finished_run(p):
        return _load_final(p, device)
    ckpt = resolve_checkpoint(p) if p.is_dir() else None
    if ckpt is not None:
        from llmscale.checkpoint.consolidate import load_checkpoint_model

        model, run_cfg = load_checkpoint_model(ckpt)
        model.to(device)
        # RUN_DIR/checkpoints/step-N -> RUN_DIR
        run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent
        tok_dir = _run_tokenizer_dir(run_dir)
        return LoadedModel(model=model, config=model.config, tokenizer=_tokenizer_of(tok_dir, None),
                           tokenizer_dir=tok_dir, kind="checkpoint", path=ckpt, run_config=run_cfg,
                           classifier=getattr(model, "clf_config", None))
    raise ExportError(
        f"{source} is neither a model folder (no {LLMSCALE_CONFIG} / config.json), nor a finished run directory "
        f"({CONFIG_FILE} + {FINAL_DIR}/{FINAL_WEIGHTS}), nor a checkpoint (`llmscale ckpt list {source}` shows a "
        f"run's checkpoints). Export a run with `llmscale export RUN_DIR OUT`, or point at one.")
