"""lm-evaluation-harness adapter: any llmscale causal LM as an ``lm_eval`` model, and the eval job's entry to it.

* :class:`LLMScaleLM` is an ``lm_eval.api.model.LM`` registered as ``"llmscale"``, built from anything
  :func:`llmscale.artifacts.load_model` reads (run directory, checkpoint, llmscale export, transformers folder)
  or from an already loaded :class:`~llmscale.artifacts.LoadedModel`::

      import lm_eval, llmscale.harness
      lm_eval.simple_evaluate(model="llmscale", model_args="pretrained=RUN_DIR,batch_size=4", tasks=[...])
      lm_eval.simple_evaluate(model=llmscale.harness.LLMScaleLM(load_model(RUN_DIR)), tasks=[...])

  ``loglikelihood`` and ``loglikelihood_rolling`` score through :mod:`llmscale.scoring`, the same code as
  ``llmscale eval``'s own perplexity and continuation scoring, so the two agree by construction. Requests are
  tokenised the way the harness's transformers model class (``HFLM``) does it: context and continuation are
  encoded together and split where the context's own encoding ends, trailing whitespace of the context moved
  into the continuation, and an empty context becomes the prefix token (the end-of-document id: what
  llmscale's GPT data puts between documents). ``loglikelihood_rolling`` scores ``[prefix] + text`` in windows
  of ``max_length`` that score every token once, the last one with a full context (``align="end"`` in
  :mod:`llmscale.scoring`: the harness's ``get_rolling_token_windows`` with ``context_len=1``).
  ``generate_until`` decodes with :func:`llmscale.models.generate.generate` (greedy unless the request
  samples) and stops at the first ``until`` string or the end-of-document id.
* :func:`run_harness` runs a list of harness tasks on a loaded model, offline, for the ``harness`` task of
  ``llmscale eval``, and returns a JSON-ready dict. The bundled task folder (``configs/harness``, with the
  offline multiple-choice task ``llmscale_mc``) is always on the include path.

Single process: data-parallel harness runs (``accelerate launch -m lm_eval``) are not supported. The ``lm_eval``
command line knows the model only once ``llmscale.harness`` is imported (the harness has no plugin discovery):
``configs/harness/llmscale_mc.yaml`` shows the one-line wrapper.

What does not live here: the scoring arithmetic (:mod:`llmscale.scoring`), loading models
(:mod:`llmscale.artifacts`), sampling (:mod:`llmscale.models.generate`), the eval job's config and output files
(:mod:`llmscale.jobs.eval`), the task data and its loader (``configs/harness``).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llmscale.errors import ConfigError

try:
    import lm_eval
    import lm_eval.models  # noqa: F401  the harness's own model names: lm_eval adds them only to an empty registry
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra is not installed
    raise ConfigError("the harness task needs lm-evaluation-harness: pip install 'llmscale[harness]' "
                      f"(importing lm_eval failed: {e})") from e

import torch

from llmscale.artifacts import LoadedModel, load_model
from llmscale.log import get_logger
from llmscale.models.generate import generate
from llmscale.scoring import score_continuations, score_windows, stream_windows

log = get_logger(__name__)

#: The bundled tasks (``llmscale_mc``); always on :func:`run_harness`'s include path.
LOCAL_TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "harness"
#: ``max_length`` of an LSTM (no positions table to bound it): the most context the harness gives it.
LSTM_MAX_LENGTH = 1024
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_GEN_TOKS", "LLMScaleLM", "LOCAL_TASKS_DIR", "LSTM_MAX_LENGTH",
           "run_harness"]


class _StopGeneration(Exception):
    """Raised from generate()'s per-token callback once every row of a batch has reached a stop."""


def _int_option(name: str, value: Any) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        auto = " (the llmscale harness model has no automatic batch size)" if name == "batch_size" else ""
        raise ConfigError(f"{name}={value!r} is not an integer: give a number, e.g. {name}=8{auto}.") from None
    if out < 1:
        raise ConfigError(f"{name}={value!r} must be >= 1.")
    return out


@register_model("llmscale")
class LLMScaleLM(LM):
    """An llmscale causal LM (family gpt or lstm) seen by lm-evaluation-harness.

    ``pretrained``: a model source for :func:`llmscale.artifacts.load_model`, or a :class:`LoadedModel`.
    ``batch_size``: sequences per forward pass. ``device``: where the model runs (default: where a LoadedModel
    already is; for a path, cuda when available). ``max_length``: most tokens in one forward pass (default the
    model's ``max_seq_len``; :data:`LSTM_MAX_LENGTH` for an LSTM). ``max_gen_toks``: generation length when a
    request names none. ``prefix_token_id``: the token an empty context becomes (default the end-of-document
    id). ``seed``: seeds sampling (greedy requests do not use it). ``max_batch_size`` is accepted and ignored
    (the harness passes it to every model class)."""

    def __init__(self, pretrained: Any = None, *, batch_size: Any = DEFAULT_BATCH_SIZE, device: Optional[str] = None,
                 max_length: Any = None, max_gen_toks: Any = DEFAULT_MAX_GEN_TOKS, prefix_token_id: Any = None,
                 seed: Any = 1234, max_batch_size: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown option(s) for the llmscale harness model: {', '.join(sorted(unknown))}. "
                              f"It takes pretrained, batch_size, device, max_length, max_gen_toks, prefix_token_id "
                              f"and seed.")
        if pretrained is None:
            raise ConfigError("the llmscale harness model needs pretrained=SOURCE (a run directory, checkpoint, "
                              "`llmscale export` folder or transformers folder), e.g. model_args='pretrained=runs/x'.")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={device} but torch sees no CUDA GPU here: give device=cpu (on the lm_eval "
                              f"command line: --device cpu).")
        if isinstance(pretrained, LoadedModel):
            loaded = pretrained
            if device is not None:
                loaded.model.to(device)
        else:
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            loaded = load_model(str(pretrained), device=str(device))
        cfg = loaded.config
        if loaded.classifier is not None or getattr(cfg, "family", None) not in ("gpt", "lstm"):
            what = "a sequence classifier" if loaded.classifier is not None else f"family {cfg.family!r}"
            raise ConfigError(f"{loaded.path} is {what}: the harness scores and generates with a causal LM "
                              f"(model.family gpt or lstm).")
        tok = loaded.require_tokenizer()
        if tok.eos_id is None:
            raise ConfigError(f"the tokenizer of {loaded.path} has no end-of-document token: the harness needs one "
                              f"to end generations and start empty contexts.")
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = tok
        self._device = next(self.model.parameters()).device
        self._batch_size = _int_option("batch_size", batch_size)
        self._max_gen_toks = _int_option("max_gen_toks", max_gen_toks)
        self._seed = int(seed)
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else int(tok.eos_id)
        limit = None if cfg.family == "lstm" else int(cfg.max_seq_len)
        self._max_length = (limit or LSTM_MAX_LENGTH) if max_length is None else _int_option("max_length", max_length)
        if limit is not None and self._max_length > limit:
            raise ConfigError(f"max_length={self._max_length} exceeds the model's max_seq_len={limit} (its positions "
                              f"table): give max_length <= {limit}.")
        log.info("harness model: %s (%s, family %s) on %s, max_length %d, batch size %d", loaded.path, loaded.kind,
                 cfg.family, self._device, self._max_length, self._batch_size)

    # ------------------------------------------------------------------ what the harness reads

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.tokenizer_dir or self.loaded.path)

    def get_model_info(self) -> dict:
        """Recorded in the harness's results ``config``: where the model came from and its shape."""
        cfg = self.loaded.config
        return {"model_source": str(self.loaded.path), "model_kind": self.loaded.kind, "family": cfg.family,
                "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
                "vocab_size": getattr(cfg, "vocab_size", None), "max_length": self._max_length,
                "prefix_token_id": self._prefix, "tokenizer": self.tokenizer_name}

    # ------------------------------------------------------------------ tokenisation (as HFLM)

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` as lm_eval's ``TemplateLM.loglikelihood`` and ``_encode_pair``:
        an empty context is the prefix token (or, when the continuation starts with it, that first token);
        otherwise trailing whitespace of the context joins the continuation, the two are encoded together and
        split where the context's own encoding ends."""
        if context == "":
            cont = self.tok_encode(continuation)
            if cont and cont[0] == self._prefix:
                return cont[:1], cont[1:]
            return [self._prefix], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ the three request types

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of each ``(context, continuation)`` request; a continuation with no
        tokens of its own has log-likelihood 0."""
        args = [tuple(r.args) for r in requests]
        pairs = [self.encode_pair(ctx, cont) for ctx, cont in args]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        # longest first, as HFLM: batches of similar lengths pad less (the padding does not change a result)
        todo.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scored = score_continuations(self.model, [pairs[i] for i in todo], max_len=self._max_length,
                                     batch_size=self._batch_size)
        for i, (ll, greedy) in zip(todo, scored):
            out[i] = (float(ll), bool(greedy))
        for a, res in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: ``[prefix] + tokens`` in windows of ``max_length`` (every token
        scored once, the last window with a full context), the windows of all requests batched together."""
        texts = [r.args[0] for r in requests]
        streams = [[self._prefix] + self.tok_encode(t) for t in texts]
        windows = stream_windows(streams, context=self._max_length, stride=self._max_length, align="end")
        per_window = score_windows(self.model, streams, windows, batch_size=self._batch_size)
        nats = [0.0] * len(streams)
        for w, (n, _, _) in zip(windows, per_window):
            nats[w.doc] += n
        out = [-n for n in nats]
        for t, ll in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), ll)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each ``(context, gen_kwargs)`` request by up to ``max_gen_toks`` tokens (greedy unless
        ``do_sample`` with a temperature), cut before the first ``until`` string, stopped at eos."""
        from lm_eval.models.utils import normalize_gen_kwargs

        args = [tuple(r.args) for r in requests]
        plans = [self._gen_plan(ctx, dict(normalize_gen_kwargs(dict(kw or {}), self._max_gen_toks)))
                 for ctx, kw in args]
        groups: dict[tuple[str, int], list[int]] = {}
        for i, plan in enumerate(plans):  # same settings and prompt length: one batch (no padding needed)
            key = json.dumps({k: v for k, v in plan.items() if k != "prompt"}, sort_keys=True, default=str)
            groups.setdefault((key, len(plan["prompt"])), []).append(i)
        out = [""] * len(args)
        n_batch = 0
        for idx in groups.values():
            for s in range(0, len(idx), self._batch_size):
                chunk = idx[s:s + self._batch_size]
                for i, text in zip(chunk, self._generate_batch([plans[i] for i in chunk], seed=self._seed + n_batch)):
                    out[i] = text
                n_batch += 1
        for a, text in zip(args, out):
            self.cache_hook.add_partial("generate_until", a, text)
        return out

    # ------------------------------------------------------------------ generation helpers

    def _gen_plan(self, context: str, kwargs: dict) -> dict:
        until = [s for s in kwargs.pop("until", None) or [] if s]
        max_new = _int_option("max_gen_toks", kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            log.warning("generation option(s) the llmscale harness model does not support, ignored: %s",
                        ", ".join(sorted(kwargs)))
        keep = self._max_length - max_new
        if keep < 1:
            raise ConfigError(f"max_gen_toks={max_new} leaves no room for the prompt in max_length="
                              f"{self._max_length}: lower max_gen_toks or raise max_length.")
        prompt = self.tok_encode(context)[-keep:] or [self._prefix]
        return {"prompt": prompt, "until": until, "max_new": max_new,
                "temperature": temperature if do_sample and temperature > 0 else 0.0,
                "top_k": None if top_k is None else int(top_k), "top_p": None if top_p is None else float(top_p)}

    def _cut(self, ids: list[int], until: list[str]) -> tuple[str, bool]:
        """``ids`` decoded up to eos and cut before the earliest stop string; and whether a stop was reached."""
        eos = self.eot_token_id
        hit_eos = eos in ids
        if hit_eos:
            ids = ids[:ids.index(eos)]
        text = self.tok_decode(ids)
        cuts = [text.find(s) for s in until if s in text]
        if cuts:
            return text[:min(cuts)], True
        return text, hit_eos

    def _generate_batch(self, plans: list[dict], *, seed: int) -> list[str]:
        p = plans[0]
        new: list[list[int]] = [[] for _ in plans]
        done = [False] * len(plans)

        def on_token(nxt: torch.Tensor) -> None:
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    new[r].append(int(t))
                    done[r] = self._cut(new[r], plans[r]["until"])[1]
            if all(done):
                raise _StopGeneration

        ids = torch.tensor([q["prompt"] for q in plans], dtype=torch.long)
        try:
            generate(self.model, ids, max_new_tokens=p["max_new"], temperature=p["temperature"], top_k=p["top_k"],
                     top_p=p["top_p"], seed=seed, eos_id=self.eot_token_id, on_token=on_token)
        except _StopGeneration:
            pass
        return [self._cut(n, q["until"])[0] for n, q in zip(new, plans)]


# --------------------------------------------------------------------------- running tasks (the eval job)


def _jsonable(obj: Any) -> Any:
    """``obj`` with what JSON cannot hold made plain: numpy/torch scalars to numbers, tuples to lists,
    non-finite floats to None, other objects (functions, classes) to their ``str``."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if callable(getattr(obj, "item", None)):
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def _metrics(task_results: dict) -> dict:
    """lm_eval's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` as ``{"acc": x, "acc_stderr": s}`` (a
    filter other than ``none`` stays in the name, e.g. ``exact_match,strict-match``); non-numbers dropped."""
    out: dict[str, Any] = {}
    for key, value in task_results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key[:-len(",none")] if key.endswith(",none") else key
        out[name] = value if math.isfinite(value) else None
    return out


def _task_manager(names: list[str], include: list[Path]) -> Any:
    """A TaskManager over ``include``; the harness's own ~15k task YAMLs (seconds to index) join only when a
    name is not found there."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
    if any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=[str(p) for p in include])
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        folders = ", ".join(str(p) for p in include)
        raise ConfigError(f"unknown harness task(s) {', '.join(missing)}: not among the harness's tasks nor in "
                          f"{folders}. Give a task name from one of those, a path to a task YAML, or add its folder "
                          f"with include_path.")
    return tm


def run_harness(loaded: LoadedModel | LLMScaleLM | str | Path, *, tasks: Sequence[str | Path],
                include_path: Sequence[str | Path] = (), num_fewshot: Optional[int] = None,
                limit: Optional[int] = None, batch_size: int = DEFAULT_BATCH_SIZE, device: Optional[str] = None,
                seed: int = 1234, bootstrap_iters: int = 100_000, keep_samples: bool = False) -> dict:
    """Run lm-evaluation-harness ``tasks`` (names, or paths to task YAMLs: their folder joins the include path)
    on a model, offline, and return a JSON-ready dict::

        {"results": {task: {metric: value, ...}, ...},      # "acc", "acc_stderr", "acc_norm", ...
         "n-samples": {task: {"original": N, "effective": n}}, "configs": {task: task config},
         "versions": {task: version}, "n-shot": {task: k}, "higher_is_better": {task: {metric: bool}},
         "config": {model info, seeds, limit, ...}, "lm_eval_version": "0.4.x",
         "groups": {group: {metric: value}} (when a group ran), "samples": {task: [...]} (with keep_samples)}

    ``loaded``: a LoadedModel, a model source for :func:`llmscale.artifacts.load_model`, or a built
    :class:`LLMScaleLM` (then ``batch_size``, ``device`` and ``seed`` do not change it). ``include_path`` adds
    task folders to the bundled one (:data:`LOCAL_TASKS_DIR`). ``seed`` seeds python, numpy, torch and the
    few-shot sampler, as the harness does. A task whose data cannot be loaded (the harness's own tasks download
    from the Hugging Face hub) raises a ConfigError that says so."""
    from importlib.metadata import version

    if not tasks:
        raise ConfigError("the harness task needs at least one task name, e.g. tasks: [llmscale_mc].")
    include: list[Path] = [LOCAL_TASKS_DIR] if LOCAL_TASKS_DIR.is_dir() else []
    for p in include_path:
        folder = Path(p).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"harness include_path {p} is not a folder (of task YAMLs).")
        include.append(folder)
    specs: list[str] = []
    names: list[str] = []
    for t in tasks:
        path = Path(str(t)).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"harness task file {t} does not exist.")
            include.append(path.parent)
            specs.append(str(path.resolve()))
        else:
            specs.append(str(t))
            names.append(str(t))
    include = list(dict.fromkeys(p.resolve() for p in include))
    tm = _task_manager(names, include)
    try:
        built = tm.load(specs)
    except ConfigError:
        raise
    except Exception as e:  # data set loaders raise anything (ConnectionError, hub errors): say what to do
        raise ConfigError(f"harness task(s) {', '.join(map(str, tasks))} could not be loaded ({type(e).__name__}: "
                          f"{e}). Offline, only tasks whose data is on disk can run; the harness's own tasks "
                          f"download theirs from the Hugging Face hub. Use a local task such as llmscale_mc "
                          f"({LOCAL_TASKS_DIR}).") from e
    # built Task objects are not loaded twice; a group is passed by name (the harness rebuilds it)
    task_arg: list[Any] = list(built["tasks"].values()) if not built["groups"] else specs

    lm = loaded if isinstance(loaded, LLMScaleLM) else LLMScaleLM(loaded, batch_size=batch_size, device=device,
                                                                 seed=seed)
    out = lm_eval.simple_evaluate(model=lm, tasks=task_arg, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters,
                                  log_samples=keep_samples)
    if out is None:  # not the main process
        return {}
    result: dict[str, Any] = {
        "results": {task: _metrics(r) for task, r in out.get("results", {}).items()},
        "n-samples": _jsonable(out.get("n-samples", {})),
        "configs": _jsonable(out.get("configs", {})),
        "versions": _jsonable(out.get("versions", {})),
        "n-shot": _jsonable(out.get("n-shot", {})),
        "higher_is_better": _jsonable(out.get("higher_is_better", {})),
        "config": _jsonable(out.get("config", {})),
        "lm_eval_version": version("lm_eval"),
    }
    if out.get("groups"):
        result["groups"] = {g: _metrics(r) for g, r in out["groups"].items()}
    if keep_samples:
        result["samples"] = _jsonable(out.get("samples", {}))
    for task, metrics in result["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        log.info("harness %s: %s", task, shown)
    return result
