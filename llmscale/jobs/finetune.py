"""``llmscale finetune CONFIG [key=value ...]``: fine-tune from any model source, on DeepSpeed.

Tasks: ``classify`` (a classification head on a BERT / GPT backbone, or the BiLSTM + attention classifier
from scratch), ``sft`` (a causal LM on prompt/response pairs: only response tokens and the closing eos are
targets; optional packing) and ``lm`` (continued pretraining on a prepared dataset).

    llmscale finetune configs/finetune_sst2_bert.yaml init.from=runs/bert_tiny
    torchrun --nproc_per_node 2 -m llmscale finetune configs/finetune_imdb_bilstm.yaml      # data parallel

``init.from``: a pretraining run dir, a checkpoint of any parallel layout (consolidated on load), an llmscale
model folder, a transformers folder (through ``llmscale import``), or ``scratch`` (``model.*`` with random
weights and ``init.tokenizer``: the floor every fine-tune result is compared with). Weights only: step 0,
a fresh optimizer and schedule. A run directory that already holds a checkpoint resumes from it instead,
exactly, like pretraining (``--no-resume`` starts afresh). The tokenizer comes with the weights.

Every optimizer step weighs every example the same however it is split over micro-batches and ranks
(``loss_over="step_targets"``). Validation (``train.eval_every``) reports accuracy, macro F1, MCC and the
loss; each new best (``train.metric``) is checkpointed and recorded in RUN_DIR/checkpoints/best.json
(retention never removes it); ``train.patience`` stops early. At the end the consolidated weights go to
RUN_DIR/final/model.pt and ``llmscale export RUN_DIR OUT`` writes a transformers folder
(``BertForSequenceClassification``, ``GPT2ForSequenceClassification``, ``LlamaForSequenceClassification``)
or, for heads no transformers class computes (BiLSTM, BERT with cls/mean pooling), an llmscale folder.
Data parallel only (ZeRO 0-3); other layouts are refused with the ones that work.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from llmscale.log import get_logger

log = get_logger(__name__)

LABELS_FILE = "labels.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML fine-tune config (see configs/finetune_*.yaml, `llmscale config show "
                                  "--finetune`).")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. init.from=runs/bert optim.lr=3e-5")
    p.add_argument("--no-resume", action="store_true",
                   help="Start from init.from even if RUN_DIR has checkpoints (they are moved aside, not deleted).")
    p.add_argument("--no-final-weights", action="store_true", help="Do not write RUN_DIR/final/model.pt at the end.")
    p.add_argument("--log-all-ranks", action="store_true", help="Log from every rank, not only rank 0.")


def main(args: argparse.Namespace) -> int:
    from llmscale.config import load_config
    from llmscale.config_finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if args.log_all_ranks:
        cfg.train.log_all_ranks = True
    summary = run(cfg, no_resume=args.no_resume, final_weights=not args.no_final_weights)
    if summary.pop("rank", 0) == 0:
        print(json.dumps(summary))
    if summary.get("stopped"):
        from llmscale.signals import EXIT_REQUEUE

        return EXIT_REQUEUE  # saved on request (preemption): run the same command again to resume
    return 0


def _initial_model(cfg: Any):
    """``(language model or None, resolved backbone ModelConfig, Tokenizer, tokenizer folder)`` of init.from."""
    from llmscale.artifacts import load_model
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.errors import ConfigError
    from llmscale.models.presets import resolve_config

    source = cfg.init.from_
    if source == "scratch":
        if not cfg.init.tokenizer:
            raise ConfigError("init.from=scratch needs init.tokenizer: the tokenizer folder to encode the data with "
                              "(e.g. one written by `llmscale tokenizer train`, or RUN_DIR/tokenizer of a run).")
        tok = Tokenizer.load(cfg.init.tokenizer)
        return None, resolve_config(cfg.model, tok.vocab_size), tok, Path(cfg.init.tokenizer)
    loaded = load_model(source)
    if loaded.classifier is not None:
        raise ConfigError(f"init.from={source} is already a classifier; fine-tune from a language model (a "
                          f"pretraining run, checkpoint or model folder), or resume its own run directory.")
    tok, tok_dir = loaded.tokenizer, loaded.tokenizer_dir
    if cfg.init.tokenizer:  # e.g. a transformers folder imported with `llmscale import`, whose tokenizer is not ours
        tok, tok_dir = Tokenizer.load(cfg.init.tokenizer), Path(cfg.init.tokenizer)
        if tok.vocab_size > loaded.config.vocab_size:
            raise ConfigError(f"init.tokenizer={cfg.init.tokenizer} has {tok.vocab_size} pieces but the model of "
                              f"init.from={source} embeds only {loaded.config.vocab_size}: give the tokenizer the "
                              f"model was trained with.")
    if not isinstance(tok, Tokenizer):
        raise ConfigError(f"init.from={source} carries no llmscale tokenizer (inputs need its [CLS]/[SEP]/pad/eos "
                          f"ids). Pass init.tokenizer=DIR (an llmscale tokenizer folder with the model's ids).")
    return loaded.model, loaded.config, tok, tok_dir


def _features(cfg: Any, tok: Any, family: str):
    """Training and validation features plus the label map; the counts are logged."""
    from llmscale.data.finetune import LabelMap, encode_classification, read_classification

    c = cfg.classify

    def read(paths, split):
        return read_classification(paths, text_field=c.text_field, text_pair_field=c.text_pair_field or None,
                                   label_field=c.label_field, split=split or None)

    train_ex = read(c.train, c.split)
    labels = LabelMap.from_examples(train_ex, labels=c.labels or None)
    kw = dict(max_len=c.max_len, family=family, truncation=c.truncation)
    train = encode_classification(train_ex, tok, labels, **kw)
    val = encode_classification(read(c.val, c.val_split or c.split), tok, labels, **kw) if c.val else None
    for name, f in (("train", train), ("val", val)):
        if f is not None:
            log.info("%s: %d examples, %d empty texts skipped, %d truncated to classify.max_len=%d", name,
                     f.num_examples, f.num_empty, f.num_truncated, c.max_len)
    return train, val, labels


def _sft_features(cfg: Any, tok: Any):
    from llmscale.data.finetune import encode_sft, read_sft

    c = cfg.sft

    def encode(paths):
        ex = read_sft(paths, prompt_field=c.prompt_field, response_field=c.response_field, template=c.template or None)
        return encode_sft(ex, tok, max_len=c.max_len, packing=c.packing)

    train = encode(c.train)
    val = encode(c.val) if c.val else None
    for name, f in (("train", train), ("val", val)):
        if f is not None:
            log.info("%s: %d rows, %d blank responses skipped, %d truncated, %d with no target left dropped", name,
                     len(f), f.num_empty, f.num_truncated, f.num_no_target)
    return train, val


def _check_lm_data(cfg: Any, tok: Any) -> None:
    """task=lm: the prepared dataset must use the weights' tokenizer (token ids would mean other things)."""
    from llmscale.data.checks import check_datasets
    from llmscale.errors import TokenizerError

    manifests = check_datasets(cfg)
    for e, m in zip(cfg.data.sources(), manifests):
        if m.tokenizer_hash != tok.hash:
            raise TokenizerError(
                f"{e.path} was prepared with tokenizer {m.tokenizer_hash[:12]}, but init.from={cfg.init.from_} uses "
                f"tokenizer {tok.hash[:12]}: the model would read ids it never learned. Re-prepare the data with the "
                f"model's tokenizer: `llmscale prepare --tokenizer {cfg.run_dir}/tokenizer --input ... --output "
                f"{e.path}-retok` (the run directory holds a copy once the job starts, or use the init run's).")


def run(cfg: Any, *, no_resume: bool = False, final_weights: bool = True) -> dict:
    """Fine-tune per ``cfg`` in this process (one rank of the job). Returns the final counters and metrics."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    from llmscale import dist as ldist
    from llmscale.config_finetune import classifier_config, resolve_pooling
    from llmscale.errors import ConfigError
    from llmscale.log import setup_logging
    from llmscale.parallel import plan_run

    setup_logging(all_ranks=cfg.train.log_all_ranks)
    world = ldist.world_for_job()
    ldist.init_distributed(world)
    monitor = ldist.PeerMonitor(timeout_s=getattr(cfg.train, "peer_timeout_s", 120.0))
    try:
        monitor.start()  # a dead node ends the job in train.peer_timeout_s, naming the lost ranks
        # rank 0 first: a checkpoint of another layout is converted once (then listed in its manifest)
        if world.is_main:
            lm, model_cfg, tok, tok_dir = _initial_model(cfg)
        ldist.barrier()
        if not world.is_main:
            lm, model_cfg, tok, tok_dir = _initial_model(cfg)
        cfg.model = model_cfg
        _check_max_len(cfg, model_cfg)  # before the (possibly long) tokenization of the data
        labels = clf_cfg = train_f = val_f = None
        if cfg.task == "classify":
            train_f, val_f, labels = _features(cfg, tok, model_cfg.family)
            # resolve what the head needs, so the saved config rebuilds exactly this model
            cfg.classify.labels = list(labels.labels)
            cfg.classify.pooling = resolve_pooling(cfg.classify.pooling, model_cfg.family)
            cfg.data.seq_len = cfg.classify.max_len
            clf_cfg = classifier_config(cfg)
        elif cfg.task == "sft":
            if model_cfg.family != "gpt":
                raise ConfigError(f"task=sft trains a causal LM; init.from={cfg.init.from_} is a {model_cfg.family} "
                                  f"model. Fine-tune a gpt-family model (or use task=classify).")
            train_f, val_f = _sft_features(cfg, tok)
            cfg.data.seq_len = cfg.sft.max_len
        else:
            cfg.data.format = "bert" if model_cfg.family == "bert" else "gpt"
            _check_lm_data(cfg, tok)
        plan = plan_run(cfg, world.world_size)
        if cfg.task != "classify" and lm is None:  # scratch LM: same architecture, random weights
            from llmscale.models import build_model

            torch.manual_seed(cfg.train.seed)
            lm = build_model(model_cfg)
        try:
            out = _fit(cfg, world=world, plan=plan, lm=lm, model_cfg=model_cfg, tok=tok, tok_dir=tok_dir,
                       train_f=train_f, val_f=val_f, labels=labels, clf_cfg=clf_cfg, no_resume=no_resume,
                       final_weights=final_weights)
        except Exception as e:
            monitor.settle(e)  # a collective that failed because a rank vanished: exit 76 naming it
            raise
        monitor.stop()
        return out
    finally:
        monitor.stop()
        ldist.shutdown()


def _check_max_len(cfg: Any, model_cfg: Any) -> None:
    """classify.max_len / sft.max_len must fit the model's positions (a BERT pretrained at 128 has 128)."""
    from llmscale.errors import ConfigError

    key = {"classify": "classify.max_len", "sft": "sft.max_len"}.get(cfg.task)
    if key is None or model_cfg.family in ("lstm", "bilstm"):
        return
    max_len = cfg.classify.max_len if cfg.task == "classify" else cfg.sft.max_len
    if max_len > model_cfg.max_seq_len:
        hint = " (classify.truncation head_tail keeps the start and the end)" if cfg.task == "classify" else ""
        raise ConfigError(
            f"{key}={max_len} exceeds the model's max_seq_len={model_cfg.max_seq_len} (init.from={cfg.init.from_} "
            f"has that many positions). Set {key}={model_cfg.max_seq_len}{hint}, or start from a model built "
            f"with more positions.")


def _fit(cfg: Any, *, world: Any, plan: Any, lm: Any, model_cfg: Any, tok: Any, tok_dir: Any, train_f: Any,
         val_f: Any, labels: Any, clf_cfg: Any, no_resume: bool, final_weights: bool) -> dict:
    import torch

    from llmscale import dist as ldist
    from llmscale.artifacts import CONFIG_FILE, record_tokenizer, save_final_weights
    from llmscale.checkpoint import CheckpointManager
    from llmscale.config import save_resolved
    from llmscale.data.finetune import FinetuneLoader
    from llmscale.engine import build_engine
    from llmscale.evaluate import classification_validation, lm_validation, sft_validation
    from llmscale.metrics import MetricsLogger
    from llmscale.models.classify import SequenceClassifier
    from llmscale.trainer import BestTracker, Trainer

    run_dir = Path(cfg.run_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record_tokenizer(run_dir, tok_dir)
        save_resolved(cfg, run_dir / CONFIG_FILE)
        if labels is not None:
            labels.save(run_dir / LABELS_FILE)
    ldist.barrier()
    if cfg.task == "classify":
        torch.manual_seed(cfg.train.seed)  # the same new head on every rank
        if lm is None:
            model = SequenceClassifier.from_config(model_cfg, clf_cfg, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
        else:
            model = SequenceClassifier.from_pretrained_lm(lm, clf_cfg, pad_id=tok.pad_id)
        log.info("classifier: %s backbone, pooling %s, %d labels %s, %.2fM parameters", model_cfg.family,
                 clf_cfg.pooling, clf_cfg.num_labels, clf_cfg.labels[:10], model.num_params() / 1e6)
    else:
        model = lm
    engine = build_engine(cfg, model, world=world, plan=plan, loss_over="step_targets")
    batch = plan.batch
    if cfg.task == "lm":
        from llmscale.data.loader import build_loader

        loader = build_loader(cfg.data, split="train", dp_rank=engine.dp_rank, dp_size=engine.dp_size,
                              global_batch_size=batch.global_batch_size, micro_batch_size=batch.micro_batch_size,
                              pad_id=tok.pad_id, mask_id=tok.mask_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
                              vocab_size=model_cfg.vocab_size, shuffle=True)
    else:
        loader = FinetuneLoader(train_f, dp_rank=engine.dp_rank, dp_size=engine.dp_size,
                                global_batch_size=batch.global_batch_size, micro_batch_size=batch.micro_batch_size,
                                seed=cfg.train.seed, pad_id=tok.pad_id, eval_features=val_f)

    def validate() -> dict:
        if cfg.task == "classify":
            out = classification_validation(engine, loader, num_labels=clf_cfg.num_labels, labels=clf_cfg.labels,
                                            max_batches=cfg.train.eval_batches or None)
            return {k: v for k, v in out.items() if k not in ("per_class",)}
        if cfg.task == "sft":
            return sft_validation(engine, loader, max_batches=cfg.train.eval_batches or None)
        return lm_validation(engine, loader, max_batches=cfg.train.eval_batches or None)

    def tokens_in(micro_batches: list) -> int:  # real (unpadded) tokens of the step, all ranks
        n = torch.tensor(float(sum(int(mb["attention_mask"].sum()) for mb in micro_batches)))
        return int(engine.all_reduce_dp(n.to(engine.device)).item())

    has_val = val_f is not None or (cfg.task == "lm" and loader.val_num_tokens > 0)
    best = BestTracker(cfg.metric_key, patience=cfg.train.patience) if has_val else None
    manager = CheckpointManager(cfg, world=world)
    metrics = MetricsLogger(run_dir, enabled=world.is_main, tensorboard=cfg.train.tensorboard,
                            total_steps=cfg.train.steps)
    try:
        trainer = Trainer(cfg, engine=engine, loader=loader, world=world, metrics=metrics, checkpoints=manager,
                          no_resume=no_resume, validate=validate if has_val else dict, best=best,
                          tokens_in=None if cfg.task == "lm" else tokens_in)
        summary = trainer.fit()
    finally:
        metrics.close()
        loader.close()
    if final_weights and not summary["stopped"]:
        save_final_weights(engine, run_dir, is_main=world.is_main)
    summary["rank"] = world.rank
    return summary
