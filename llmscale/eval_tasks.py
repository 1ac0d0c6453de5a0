"""The tasks of ``llmscale eval`` on one loaded model, over any number of ranks, and the files they write.

Each task takes a :class:`llmscale.artifacts.LoadedModel`, its config section and the world, and returns a
:class:`TaskResult`: metrics (JSON) and, for ``classify`` and ``generate``, one prediction per example.

* ``perplexity`` (causal LMs): every document of the held-out text becomes a stream ``[eos] + ids`` and
  is scored with the sliding windows of :mod:`llmscale.scoring` (every token exactly once). Reported:
  loss = total nats / tokens, token perplexity, bits per byte = total nats / ln 2 / UTF-8 bytes of the
  text, next-token accuracy and (for whitespace-separated text) word perplexity = exp(total nats /
  words), words counted as WikiText does (whitespace-separated tokens + one per line end: 245,569 on
  WikiText-2 test).
* ``mlm`` (BERT): documents cut into consecutive ``[CLS] ... [SEP]`` segments (every token in exactly one),
  masked by training's rule (:func:`llmscale.data.collate.mask_tokens`) with a fixed seed keyed by the
  segment's index: masked-LM loss, perplexity and accuracy over the selected tokens.
* ``nsp`` (BERT with its NSP head): next-sentence accuracy on a prepared BERT dataset's val pairs, built by
  training's loader (half the B segments from another document; the pairs, coins and masks from the seed),
  beside the majority baseline; the pairs are cut over ranks batch by batch, and the counts summed.
* ``classify`` (sequence classifiers): accuracy, macro precision / recall / F1, per class, MCC and the
  confusion matrix (:func:`llmscale.evaluate.classification_metrics`) with the model's own label map.
* ``generate`` (causal LMs): a completion per prompt, greedy or sampled with seed + prompt index; with
  references (``generate.reference_field``), the share of exact matches and of first-word matches.

Work is split over ranks item by item (window, segment, example, prompt: rank r takes r, r+W, ...), so
nothing is padded in or counted twice; every rank's per-item results are gathered and summed in item
order (float64), which makes the totals independent of the number of ranks and of the micro-batch size.

What does not live here: the windows and log-likelihoods (:mod:`llmscale.scoring`), the lm-evaluation-harness
adapter (:mod:`llmscale.harness`), training-time validation (:mod:`llmscale.evaluate`), the job (parsing,
process group: :mod:`llmscale.jobs.eval`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmscale import dist as ldist
from llmscale.errors import ConfigError, DatasetError, FinetuneDataError, TokenizerError
from llmscale.log import get_logger

log = get_logger(__name__)

MLM_TAG = 0x6D6C6D  # "mlm": the masking stream of the eval job (training uses its own tags)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PREDICTIONS = "predictions.jsonl"


@dataclass
class TaskResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Docs:
    """Held-out documents: token ids, their text (for bytes and words) and where they came from."""

    ids: list[list[int]]
    texts: list[str]
    data: list[dict[str, Any]]  # [{"path", "sha256"}] or [{"dataset", "split", "manifest_sha256"}]


# --------------------------------------------------------------------------- inputs


def _llmscale_tokenizer(loaded: Any, task: str):
    from llmscale.data.tokenizer import Tokenizer

    tok = loaded.require_tokenizer()
    if not isinstance(tok, Tokenizer):
        raise TokenizerError(f"task {task} needs the model's llmscale tokenizer (its [CLS]/[SEP]/[MASK]/pad ids); "
                             f"{loaded.path} carries a transformers one. Pass tokenizer=DIR (an llmscale tokenizer "
                             f"folder with the model's ids), or `llmscale import` the folder first.")
    return tok


def read_docs(inp: Any, tokenizer: Any, *, task: str, strip_eos: bool) -> Docs:
    """The documents of a :class:`llmscale.config_eval.TextInputs` section, tokenized. A prepared dataset must
    have been prepared with ``tokenizer``; its documents' closing eos is dropped when ``strip_eos`` (the
    streams add their own prefix), so a dataset and the raw text it came from score the same."""
    from llmscale.data.sources import iter_document_records, resolve_inputs
    from llmscale.files import sha256_file

    if inp.dataset:
        from llmscale.data.shards import MANIFEST, open_shard, read_manifest

        m = read_manifest(inp.dataset)
        tok_hash = getattr(tokenizer, "hash", None)
        if tok_hash != m.tokenizer_hash:
            raise TokenizerError(
                f"{inp.dataset} was prepared with tokenizer {m.tokenizer_hash[:12]}, but the model's tokenizer is "
                f"{(tok_hash or 'a transformers one')[:12]}: its ids would mean other tokens. Score the raw text "
                f"instead ({task}.files=[...]), or re-prepare it with `llmscale prepare --tokenizer MODEL_TOKENIZER "
                f"--input ... --output {inp.dataset}-retok`.")
        ids: list[list[int]] = []
        for shard in m.shards(inp.split):
            view = open_shard(m.root / shard.path)
            for i in range(view.num_documents):
                d = view.document(i).tolist()
                if strip_eos and d and d[-1] == tokenizer.eos_id:
                    d = d[:-1]
                ids.append(d)
        texts = [tokenizer.decode(d) for d in ids]  # lossless: the text the tokens came from
        data = [{"dataset": str(inp.dataset), "split": inp.split,
                 "manifest_sha256": sha256_file(Path(inp.dataset) / MANIFEST)}]
        if not ids:
            raise DatasetError(f"{inp.dataset} has no documents in split {inp.split!r}: choose {task}.split=train, or "
                               f"score raw text with {task}.files=[...].")
    else:
        files = resolve_inputs(inp.files)
        texts = []
        for d in iter_document_records(inp.files, text_field=inp.text_field, doc_split=inp.doc_split):
            if d.part > 0 and texts:  # the reader cuts very long documents into pieces: score them as one
                texts[-1] += d.text
            else:
                texts.append(d.text)
        if not texts:
            raise DatasetError(f"{task}.files={inp.files} hold no text (empty or whitespace-only documents only): "
                               f"give held-out text, or check {task}.text_field={inp.text_field!r}.")
        ids = [list(x) for x in (tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch")
                                 else [tokenizer.encode(t) for t in texts])]
        data = [{"path": str(p), "sha256": sha256_file(p)} for p in files]
    return Docs(ids=ids, texts=texts, data=data)


def file_records(paths: list[str]) -> list[dict[str, Any]]:
    """``{"path", "sha256"}`` per input (an ``archive::member`` path: the archive's hash; a folder: the hash of
    its sorted file list with each file's hash)."""
    import hashlib

    from llmscale.files import hash_files, relative_files, sha256_file

    out = []
    for raw in paths:
        base = Path(str(raw).split("::")[0])
        if base.is_file():
            out.append({"path": str(raw), "sha256": sha256_file(base)})
        elif base.is_dir():
            listing = hash_files(base, relative_files(base))
            digest = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in listing.items()}, sort_keys=True).encode())
            out.append({"path": str(raw), "sha256": digest.hexdigest(), "hash_of": "sorted files and their sha256"})
        else:
            out.append({"path": str(raw), "sha256": None})
    return out


def _gather_in_order(mine: list, n: int) -> list:
    from llmscale.scoring import merge_ranked

    return merge_ranked(ldist.all_gather_object(mine), n)


def _share(n: int, world: Any) -> range:
    from llmscale.scoring import rank_share

    return rank_share(n, rank=world.rank, world_size=world.world_size)


def count_words(text: str) -> int:
    """WikiText's word count: whitespace-separated tokens plus one end-of-line token per line."""
    return len(text.split()) + text.count("\n") + (0 if text.endswith("\n") or not text else 1)


def _mostly_cjk(text: str) -> bool:
    sample = text[:200_000]
    cjk = sum(1 for c in sample if "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff")
    return cjk > 0.3 * max(1, len(sample.strip()))


# --------------------------------------------------------------------------- perplexity


def perplexity_task(loaded: Any, cfg: Any, *, batch_size: int, world: Any) -> TaskResult:
    from llmscale.scoring import score_windows, stream_windows

    model, family = loaded.model, loaded.config.family
    if family not in ("gpt", "lstm") or loaded.classifier is not None:
        raise ConfigError(f"task perplexity scores a causal LM; {loaded.path} is a {family} "
                          f"{'classifier' if loaded.classifier is not None else 'model'}. Use task mlm for a BERT, "
                          f"classify for a classifier.")
    tok = loaded.require_tokenizer()
    if tok.eos_id is None:
        raise TokenizerError(f"the tokenizer of {loaded.path} has no eos token to start each document with.")
    max_len = loaded.config.max_seq_len
    context = cfg.context or max_len
    if family == "gpt" and context > max_len:
        raise ConfigError(f"perplexity.context={context} exceeds the model's max_seq_len={max_len}: use "
                          f"perplexity.context={max_len} (or 0).")
    stride = cfg.stride or context
    if stride > context:
        raise ConfigError(f"perplexity.stride={stride} exceeds perplexity.context={context}.")
    docs = read_docs(cfg, tok, task="perplexity", strip_eos=True)
    streams = [[tok.eos_id, *d] for d in docs.ids]
    windows = stream_windows(streams, context=context, stride=stride)
    if not windows:
        raise DatasetError("perplexity: the documents hold no token to score.")
    mine_idx = list(_share(len(windows), world))
    order = sorted(range(len(mine_idx)), key=lambda j: -(windows[mine_idx[j]].end - windows[mine_idx[j]].start))
    t0 = time.perf_counter()
    scored = score_windows(model, streams, [windows[mine_idx[j]] for j in order], batch_size=batch_size,
                           pad_id=getattr(tok, "pad_id", 0) or 0)
    mine: list = [None] * len(mine_idx)
    for j, r in zip(order, scored):
        mine[j] = r
    seconds = time.perf_counter() - t0
    per_window = _gather_in_order(mine, len(windows))
    nats = math.fsum(r[0] for r in per_window)
    n = sum(r[1] for r in per_window)
    correct = sum(r[2] for r in per_window)
    fed = sum(w.end - w.start for w in windows)
    nbytes = sum(len(t.encode("utf-8")) for t in docs.texts)
    loss = nats / n
    out: dict[str, Any] = {
        "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": nats / math.log(2) / nbytes,
        "accuracy": correct / n, "tokens": n, "bytes": nbytes, "documents": len(streams), "windows": len(windows),
        "tokens_fed": fed, "nats": nats,
        "long_documents": sum(1 for s in streams if len(s) - 1 > context),
    }
    whole = "".join(docs.texts)
    want_words = cfg.word_perplexity if cfg.word_perplexity is not None else not _mostly_cjk(whole)
    if want_words:
        words = sum(count_words(t) for t in docs.texts)
        out.update(words=words, word_perplexity=math.exp(min(nats / words, 700.0)))
    out["settings"] = {"context": context, "stride": stride, "prefix": "eos", "doc_split": cfg.doc_split,
                       "text_field": cfg.text_field, "split": cfg.split if cfg.dataset else None}
    out["data"] = docs.data
    out["seconds_scoring"] = ldist.all_gather_object(seconds)
    return TaskResult(out)


# --------------------------------------------------------------------------- mlm


def mlm_task(loaded: Any, cfg: Any, *, batch_size: int, world: Any) -> TaskResult:
    import torch

    from llmscale.data.collate import MaskSpec, mask_tokens

    model = loaded.model
    if loaded.config.family != "bert" or loaded.classifier is not None:
        raise ConfigError(f"task mlm needs a BERT masked LM; {loaded.path} is a {loaded.config.family} "
                          f"{'classifier' if loaded.classifier is not None else 'model'}. Use task perplexity for a "
                          f"GPT.")
    tok = _llmscale_tokenizer(loaded, "mlm")
    seq_len = cfg.seq_len or min(128, loaded.config.max_seq_len)
    if seq_len > loaded.config.max_seq_len:
        raise ConfigError(f"mlm.seq_len={seq_len} exceeds the model's max_seq_len={loaded.config.max_seq_len}.")
    docs = read_docs(cfg, tok, task="mlm", strip_eos=True)
    body = seq_len - 2
    segments = [d[i:i + body] for d in docs.ids for i in range(0, len(d), body)]
    segments = [s for s in segments if s]
    if not segments:
        raise DatasetError("mlm: the documents hold no token.")
    spec = MaskSpec(seq_len=seq_len, vocab_size=min(tok.vocab_size, loaded.config.vocab_size),
                    mlm_probability=cfg.mlm_probability, nsp=False, pad_id=tok.pad_id, mask_id=tok.mask_id,
                    cls_id=tok.cls_id, sep_id=tok.sep_id)
    device = next(model.parameters()).device
    mine_idx = list(_share(len(segments), world))
    mine: list = []
    with torch.no_grad():
        for i in range(0, len(mine_idx), batch_size):
            rows = np.array(mine_idx[i:i + batch_size], dtype=np.int64)
            T = max(len(segments[g]) for g in rows) + 2
            ids = np.full((len(rows), T), tok.pad_id, dtype=np.int64)
            att = np.zeros((len(rows), T), dtype=np.int64)
            for r, g in enumerate(rows.tolist()):
                s = segments[g]
                ids[r, :len(s) + 2] = [tok.cls_id, *s, tok.sep_id]
                att[r, :len(s) + 2] = 1
            masked, labels = mask_tokens(ids, att, spec, seed=cfg.seed, tag=MLM_TAG, positions=rows)
            logits = model(torch.from_numpy(masked).to(device), attention_mask=torch.from_numpy(att).to(device),
                           token_type_ids=torch.zeros_like(torch.from_numpy(att)).to(device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            lab = torch.from_numpy(labels).to(device)
            for r in range(len(rows)):
                keep = lab[r] != -100
                tgt = lab[r][keep]
                lp = logp[r][keep]
                nats = -lp.gather(1, tgt[:, None]).squeeze(1).double().sum().item() if len(tgt) else 0.0
                mine.append((nats, int(keep.sum()), int((lp.argmax(-1) == tgt).sum()) if len(tgt) else 0))
    per_seg = _gather_in_order(mine, len(segments))
    nats = math.fsum(r[0] for r in per_seg)
    n = sum(r[1] for r in per_seg)
    if n == 0:
        raise DatasetError("mlm: no token was selected for masking (too little text for mlm.mlm_probability).")
    loss = nats / n
    return TaskResult({
        "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": sum(r[2] for r in per_seg) / n,
        "masked_tokens": n, "segments": len(segments), "documents": len(docs.ids),
        "tokens": sum(len(s) for s in segments),
        "settings": {"seq_len": seq_len, "mlm_probability": cfg.mlm_probability, "seed": cfg.seed,
                     "rule": "80% [MASK] / 10% random / 10% kept", "doc_split": cfg.doc_split,
                     "split": cfg.split if cfg.dataset else None},
        "data": docs.data,
    })


# --------------------------------------------------------------------------- nsp


def nsp_task(loaded: Any, cfg: Any, *, batch_size: int, world: Any) -> TaskResult:
    """Held-out next-sentence accuracy: the val pairs of training's BERT loader (its rule: half of the B segments
    replaced by the start of another document's sample, a coin per pair from the seed), masked as in training."""
    import torch

    from llmscale.config import DataConfig
    from llmscale.data.loader import build_loader
    from llmscale.data.shards import MANIFEST, read_manifest
    from llmscale.files import sha256_file

    model = loaded.model
    if loaded.config.family != "bert" or loaded.classifier is not None or getattr(model, "nsp_head", None) is None:
        raise ConfigError(f"task nsp needs a BERT pretrained with its next-sentence head (model.nsp_head=true, "
                          f"data.nsp=true); {loaded.path} has none. Use task mlm for a masked-LM-only BERT.")
    tok = _llmscale_tokenizer(loaded, "nsp")
    m = read_manifest(cfg.dataset)
    if m.kind != "bert":
        raise DatasetError(f"nsp.dataset={cfg.dataset} was prepared for {m.kind.upper()}; NSP pairs need sentence "
                           f"boundaries: `llmscale prepare --format bert --tokenizer MODEL_TOKENIZER ...`.")
    if m.tokenizer_hash != tok.hash:
        raise TokenizerError(f"{cfg.dataset} was prepared with tokenizer {m.tokenizer_hash[:12]}, the model's is "
                             f"{tok.hash[:12]}: re-prepare it with `llmscale prepare --format bert --tokenizer "
                             f"MODEL_TOKENIZER --input ... --output {cfg.dataset}-retok`.")
    seq_len = cfg.seq_len or min(128, loaded.config.max_seq_len)
    if seq_len > loaded.config.max_seq_len:
        raise ConfigError(f"nsp.seq_len={seq_len} exceeds the model's max_seq_len={loaded.config.max_seq_len}.")
    data = DataConfig(path=str(cfg.dataset), format="bert", seq_len=seq_len, nsp=True, seed=cfg.seed)
    data.validate()
    loader = build_loader(data, split="val", dp_rank=world.rank, dp_size=world.world_size,
                          global_batch_size=world.world_size * batch_size, micro_batch_size=batch_size,
                          pad_id=tok.pad_id, mask_id=tok.mask_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
                          vocab_size=loaded.config.vocab_size, shuffle=False)
    device = next(model.parameters()).device
    confusion = np.zeros((2, 2), dtype=np.int64)  # [gold][pred]; 0 = B is the real next segment, 1 = random
    nats = 0.0
    with torch.no_grad():
        for b in loader.eval_batches():
            out = model(b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                        token_type_ids=b["token_type_ids"].to(device))
            gold = b["next_sentence_label"].to(device)
            keep = gold != -100
            logits = out.nsp_logits.float()[keep]
            g = gold[keep]
            nats += float(torch.nn.functional.cross_entropy(logits, g, reduction="sum")) if len(g) else 0.0
            pred = logits.argmax(-1)
            for gi, pi in zip(g.tolist(), pred.tolist()):
                confusion[gi, pi] += 1
    parts = ldist.all_gather_object((confusion.tolist(), nats))
    confusion = sum((np.array(c, dtype=np.int64) for c, _ in parts), np.zeros((2, 2), dtype=np.int64))
    nats = math.fsum(x for _, x in parts)
    n = int(confusion.sum())
    if n == 0:
        raise DatasetError(f"nsp: {cfg.dataset} has no validation pairs; re-prepare it with a larger --val-fraction.")
    random_share = float(confusion[1].sum() / n)
    return TaskResult({
        "accuracy": float(np.trace(confusion) / n), "loss": nats / n, "pairs": n,
        "random_next_share": random_share, "majority_baseline": max(random_share, 1 - random_share),
        "confusion": confusion.tolist(), "confusion_order": ["is_next", "random_next"],
        "settings": {"seq_len": seq_len, "seed": cfg.seed, "split": "val", "masked_inputs": True},
        "data": [{"dataset": str(cfg.dataset), "split": "val",
                  "manifest_sha256": sha256_file(Path(cfg.dataset) / MANIFEST)}],
    })


# --------------------------------------------------------------------------- classify


def _classify_defaults(loaded: Any, cfg: Any) -> tuple[int, str]:
    run = loaded.run_config
    run_clf = getattr(run, "classify", None) if getattr(run, "task", None) == "classify" else None
    max_len = cfg.max_len or (run_clf.max_len if run_clf is not None else loaded.config.max_seq_len)
    truncation = cfg.truncation or (run_clf.truncation if run_clf is not None else "head")
    if loaded.config.family != "bilstm" and max_len > loaded.config.max_seq_len:
        raise ConfigError(f"classify.max_len={max_len} exceeds the model's max_seq_len={loaded.config.max_seq_len}.")
    return max_len, truncation


def classify_task(loaded: Any, cfg: Any, *, batch_size: int, world: Any) -> TaskResult:
    import torch

    from llmscale.data.classify_data import LabelMap, encode_classification, read_classification
    from llmscale.evaluate import classification_metrics

    clf = loaded.classifier
    if clf is None:
        raise ConfigError(f"task classify needs a sequence classifier; {loaded.path} is a "
                          f"{loaded.config.family} language model. Fine-tune one with `llmscale finetune "
                          f"configs/finetune_sst2_bert.yaml init.from={loaded.path}` and evaluate its run dir.")
    tok = _llmscale_tokenizer(loaded, "classify")
    examples = read_classification(cfg.files, text_field=cfg.text_field, text_pair_field=cfg.text_pair_field or None,
                                   label_field=cfg.label_field, split=cfg.split or None)
    labels = LabelMap(clf.labels)
    unknown = sorted({ex.label for ex in examples if ex.label is not None and ex.label not in labels})
    if unknown:
        raise FinetuneDataError(
            f"classify.files={cfg.files}: gold labels {unknown[:10]} are not in the model's label map {clf.labels}. "
            f"Check classify.label_field={cfg.label_field!r} (and the label spelling), or evaluate a model "
            f"fine-tuned with these labels.")
    unlabelled = sum(1 for ex in examples if ex.label is None)
    if unlabelled:
        raise FinetuneDataError(f"classify.files={cfg.files}: {unlabelled} examples have no gold label; the classify "
                                f"task scores labelled examples only.")
    max_len, truncation = _classify_defaults(loaded, cfg)
    family = loaded.config.family
    kept = [i for i, ex in enumerate(examples)
            if ex.text.strip() and (ex.text_pair is None or ex.text_pair.strip())]
    feats = encode_classification(examples, tok, labels, max_len=max_len, family=family, truncation=truncation)
    if len(feats) == 0:
        raise FinetuneDataError(f"classify.files={cfg.files}: every example has a blank text; nothing to score.")
    assert len(kept) == len(feats)
    device = loaded.model.parameters().__next__().device
    mine_idx = list(_share(len(feats), world))
    mine: list = []
    with torch.no_grad():
        for i in range(0, len(mine_idx), batch_size):
            rows = np.array(mine_idx[i:i + batch_size], dtype=np.int64)
            batch = feats.collate(rows, pad_id=tok.pad_id)
            gold = batch.pop("labels")
            inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            logits = loaded.model(**inputs).logits.float()
            logp = torch.log_softmax(logits, dim=-1).double().cpu().numpy()
            for r, g in enumerate(rows.tolist()):
                pred = int(logp[r].argmax())
                mine.append((g, int(gold[r]), pred, float(-logp[r, gold[r]]), float(np.exp(logp[r, pred]))))
    per_ex = _gather_in_order(mine, len(feats))
    K = len(clf.labels)
    cm = np.zeros((K, K), dtype=np.int64)
    for _, gold_id, pred, _, _ in per_ex:
        cm[gold_id, pred] += 1
    out = classification_metrics(cm, labels=list(clf.labels))
    out["loss"] = math.fsum(r[3] for r in per_ex) / len(per_ex)
    out.update(skipped_blank=feats.num_empty, truncated=feats.num_truncated,
               settings={"max_len": max_len, "truncation": truncation, "labels": list(clf.labels),
                         "text_field": cfg.text_field, "text_pair_field": cfg.text_pair_field or None,
                         "label_field": cfg.label_field, "split": cfg.split or None},
               data=file_records(cfg.files))
    preds = [{"task": "classify", "index": kept[g], "source": feats.sources[g], "gold": clf.labels[gold_id],
              "prediction": clf.labels[pred], "score": score}
             for g, gold_id, pred, _, score in per_ex]
    return TaskResult(out, preds)


# --------------------------------------------------------------------------- generate


def read_prompts(cfg: Any) -> list[dict[str, Any]]:
    """``[{"prompt", "reference"?, "source"}]`` from .txt (a prompt per non-empty line) and .jsonl files."""
    from llmscale.data.records import get_field, iter_rows

    out: list[dict[str, Any]] = []
    for raw in cfg.prompts:
        p = Path(raw)
        if not p.is_file():
            raise ConfigError(f"generate.prompts: {p} does not exist (give .txt files with one prompt per line, or "
                              f".jsonl files with a {cfg.prompt_field!r} field).")
        before = len(out)
        if p.suffix == ".jsonl":
            for rec, source in iter_rows(p, "jsonl"):
                item = {"prompt": str(get_field(rec, cfg.prompt_field, source, option="prompt_field")),
                        "source": source}
                if cfg.reference_field:
                    item["reference"] = str(get_field(rec, cfg.reference_field, source, option="reference_field"))
                out.append(item)
        else:
            for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    out.append({"prompt": line, "source": f"{p}:{k}"})
        if len(out) == before:
            raise ConfigError(f"generate.prompts: {p} holds no prompt.")
    return out


def generate_task(loaded: Any, cfg: Any, *, batch_size: int, world: Any) -> TaskResult:
    from llmscale.models.generate import generate_text

    if loaded.config.family not in ("gpt", "lstm") or loaded.classifier is not None:
        raise ConfigError(f"task generate needs a causal LM; {loaded.path} is a {loaded.config.family} "
                          f"{'classifier' if loaded.classifier is not None else 'model'}.")
    tok = loaded.require_tokenizer()
    prompts = read_prompts(cfg)
    limit = loaded.config.max_seq_len if loaded.config.family == "gpt" else None
    for i, item in enumerate(prompts):
        n = len(tok.encode(item["prompt"]))
        if limit is not None and n >= limit:
            raise ConfigError(f"generate: prompt {i} ({item['source']}) has {n} tokens, the model's max_seq_len is "
                              f"{limit}: shorten it (the model would not see its beginning).")
    mine: list = []
    t0 = time.perf_counter()
    for i in _share(len(prompts), world):
        r = generate_text(loaded.model, tok, prompts[i]["prompt"], max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_k=cfg.top_k or None,
                          top_p=cfg.top_p if cfg.top_p < 1.0 else None, greedy=cfg.greedy, seed=cfg.seed + i)
        mine.append((r["completion"], len(r["new_ids"])))
    seconds = time.perf_counter() - t0
    done = _gather_in_order(mine, len(prompts))
    preds = []
    for i, (item, (completion, n_new)) in enumerate(zip(prompts, done)):
        row = {"task": "generate", "index": i, "source": item["source"], "prompt": item["prompt"],
               "prediction": completion, "new_tokens": n_new}
        if "reference" in item:
            row["gold"] = item["reference"]
        preds.append(row)
    new_tokens = [d[1] for d in done]
    refs = [(r["prediction"], r["gold"]) for r in preds if "gold" in r]
    matches = {}
    if refs:  # e.g. an SFT classifier answering "positive"/"negative": scored by its first word
        matches = {"references": len(refs),
                   "exact_match": sum(p.strip() == str(g).strip() for p, g in refs) / len(refs),
                   "first_word_match": sum(_first_word(p) == _first_word(str(g)) != "" for p, g in refs) / len(refs)}
    return TaskResult({
        "prompts": len(prompts), "new_tokens": sum(new_tokens), "mean_new_tokens": sum(new_tokens) / len(prompts),
        "stopped_at_eos": sum(1 for n in new_tokens if n < cfg.max_new_tokens), **matches,
        "settings": {"greedy": cfg.greedy, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                     "top_k": cfg.top_k or None, "top_p": cfg.top_p, "seed": cfg.seed,
                     "seed_rule": "prompt i samples with seed + i"},
        "data": file_records(cfg.prompts),
        "seconds_generating": ldist.all_gather_object(seconds),
    }, preds)


def _first_word(text: str) -> str:
    """The first whitespace-separated word, lowercased, without surrounding punctuation ("" for none)."""
    words = text.split()
    return words[0].strip(".,;:!?\"'()[]").lower() if words else ""


# --------------------------------------------------------------------------- outputs


_MD_KEYS = {
    "perplexity": ["loss", "perplexity", "bits_per_byte", "word_perplexity", "accuracy", "tokens", "bytes", "words",
                   "documents", "windows"],
    "mlm": ["loss", "perplexity", "accuracy", "masked_tokens", "segments"],
    "nsp": ["accuracy", "majority_baseline", "loss", "pairs", "random_next_share"],
    "classify": ["accuracy", "f1", "precision_macro", "recall_macro", "mcc", "loss", "examples", "truncated"],
    "generate": ["prompts", "new_tokens", "mean_new_tokens", "stopped_at_eos", "references", "exact_match",
                 "first_word_match"],
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def results_markdown(report: dict[str, Any]) -> str:
    """A readable summary of ``results.json``: a table per task, with the settings that change the numbers."""
    m = report["model"]
    lines = [f"# Evaluation of `{m['source']}`", "",
             f"Weights: `{m['path']}` ({m['kind']}, {m['family']}, {m['parameters']:,} parameters); tokenizer "
             f"`{(m.get('tokenizer_hash') or 'n/a')[:12]}`; {report['world_size']} process(es), micro-batch "
             f"{report['batch_size']}.", ""]
    for name, res in report["tasks"].items():
        lines += [f"## {name}", ""]
        if name == "harness":
            lines += ["| task | metric | value |", "|---|---|---|"]
            for task, metrics in res.get("results", {}).items():
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        lines.append(f"| {task} | {k} | {_fmt(v)} |")
        else:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(res[k])} |" for k in _MD_KEYS.get(name, []) if res.get(k) is not None]
            if name == "classify":
                lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
                lines += [f"| {c} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | {v['support']} |"
                          for c, v in res["per_class"].items()]
                lines += ["", f"Confusion (rows gold, columns predicted, order {res['settings']['labels']}): "
                              f"`{res['confusion']}`"]
        if res.get("settings"):
            lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in res["settings"].items() if v is not None)]
        for d in res.get("data", []):
            lines.append(f"- data `{d.get('path') or d.get('dataset')}` sha256 "
                         f"`{(d.get('sha256') or d.get('manifest_sha256') or '')[:16]}`")
        lines.append("")
    return "\n".join(lines)


def write_results(out_dir: str | Path, report: dict[str, Any], predictions: list[dict[str, Any]]) -> Path:
    """results.json, results.md and (when there are any) predictions.jsonl in ``out_dir``, each written
    atomically (a reader sees an old file or the whole new one)."""
    from llmscale.files import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULTS_JSON, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(out / RESULTS_MD, results_markdown(report))
    pred = out / PREDICTIONS
    if predictions:
        atomic_write_text(pred, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    elif pred.exists():
        pred.unlink()  # a previous job's predictions would not belong to these results
    return out / RESULTS_JSON


def model_summary(loaded: Any, source: str) -> dict[str, Any]:
    from llmscale.artifacts import read_tokenizer_meta

    tok_hash = getattr(loaded.tokenizer, "hash", None)
    if tok_hash is None and loaded.tokenizer_dir is not None:
        tok_hash = read_tokenizer_meta(loaded.tokenizer_dir).get("hash")
    return {"source": str(source), "path": str(loaded.path), "kind": loaded.kind, "family": loaded.config.family,
            "classifier": loaded.classifier is not None,
            "parameters": sum(p.numel() for p in loaded.model.parameters()), "tokenizer_hash": tok_hash,
            "tokenizer_dir": str(loaded.tokenizer_dir) if loaded.tokenizer_dir else None,
            "max_seq_len": loaded.config.max_seq_len}


TASK_FUNCS = {"perplexity": perplexity_task, "mlm": mlm_task, "nsp": nsp_task, "classify": classify_task,
              "generate": generate_task}
