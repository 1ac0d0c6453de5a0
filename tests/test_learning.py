"""Learning: does the real pipeline (prepare -> DeepSpeed engine -> trainer) train models as well as the
known baselines? Both tests run `llmscale prepare` (as a library) and `llmscale train` (the real CLI).

* Character-level GPT on Tiny Shakespeare, nanoGPT's CPU baseline configuration (configs/char_shakespeare.yaml:
  4 layers, 4 heads, width 128, context 64, batch 12, 2,000 steps, lr 1e-3 -> 1e-4 cosine, warm-up 100,
  dropout 0, AdamW beta2 0.99, weight decay 0.1, clip 1.0; 90/10 split by characters; windows at random
  offsets as nanoGPT samples them): validation loss <= 1.91 nats per character on the whole validation text,
  on a seed drawn afresh every run (printed; LLMSCALE_TEST_SEED=N replays one). 1.91 is the worst of nanoGPT's
  own four seeds on this machine (1.891-1.908, mean 1.901, same configuration and the same whole-text score):
  any seed must do as well as nanoGPT's code does. nanoGPT's published ~1.88 is a single run, estimated on 20
  random batches; here seeds 1234 / 1 / 2 / 166580300 gave 1.879 / 1.886 / 1.887 / 1.897 (README, Results; the
  last one, drawn by this test, failed the earlier bound of 1.89, which three seeds had met by luck).
* A small BERT pretrained with next-sentence prediction: masked-LM accuracy on held-out text well above the
  unigram baseline (always predicting the training split's most frequent token), and next-sentence accuracy
  on the held-out pairs (the eval job's ``nsp`` task) more than 4 standard deviations of a coin above the
  majority baseline.
"""
import json
import os
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch

from llmscale.testing import metrics_records, run_cli

ROOT = Path(__file__).resolve().parents[1]


_records = metrics_records


@pytest.mark.slow
def test_char_gpt_reaches_nanogpt_baseline(tmp_path, corpus_path):
    from llmscale.data.prepare import prepare_dataset

    # 90/10 split by characters: the first 90% of the text trains, the last 10% validates. Each part is one
    # document; with a vanishing val_fraction the hash draws no document for validation, and prepare then
    # keeps the last document (the 10%) there.
    text = corpus_path.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    (tmp_path / "a_train.txt").write_text(text[:n], encoding="utf-8")
    (tmp_path / "b_val.txt").write_text(text[n:], encoding="utf-8")
    data = tmp_path / "char"
    m = prepare_dataset([tmp_path / "a_train.txt", tmp_path / "b_val.txt"], data, model_type="char", format="gpt",
                        seq_len=64, val_fraction=1e-9, doc_split="file", num_proc=1)
    splits = m.data["splits"]
    assert splits["val"]["num_bytes"] == len(text[n:].encode("utf-8"))  # validation is exactly the last 10%
    assert splits["val"]["num_tokens"] == len(text[n:]) + 1  # one token per character, plus the eos
    assert splits["train"]["num_tokens"] == n + 1

    seed = int(os.environ.get("LLMSCALE_TEST_SEED") or secrets.randbelow(2**31))
    print(f"char-level GPT: seed {seed} (LLMSCALE_TEST_SEED={seed} replays this run)")
    run_dir = tmp_path / "run"
    run_cli(["train", str(ROOT / "configs" / "char_shakespeare.yaml"), f"run_dir={run_dir}", f"data.path={data}",
             "train.eval_every=1000", f"train.seed={seed}", f"data.seed={seed}"], nproc=1, timeout=1500)
    val = [r for r in _records(run_dir) if r["kind"] == "val"]
    assert [v["step"] for v in val] == [1000, 2000]
    final = val[-1]
    assert final["val_full"] and final["val_tokens"] == len(text[n:])  # every val character is a target once
    print(f"char-level GPT: validation loss {final['val_loss']:.4f} nats/char after 2000 steps "
          f"({final['val_bpb']:.3f} bits/byte), seed {seed}")
    assert final["val_loss"] <= 1.91, (seed, final)
    # ASCII text: one byte per character; the split's eos token (0 bytes) makes bytes/token 111540/111541
    bytes_per_token = splits["val"]["num_bytes"] / splits["val"]["num_tokens"]
    assert final["val_bpb"] == pytest.approx(final["val_loss"] / np.log(2) / bytes_per_token, rel=1e-9)
    assert final["val_bpb"] == pytest.approx(final["val_loss"] / np.log(2), rel=1e-4)


@pytest.mark.slow
def test_bert_masked_lm_and_next_sentence_beat_their_baselines(tmp_path, tiny_bert_dataset):
    from llmscale.artifacts import load_model
    from llmscale.data.loader import build_loader
    from llmscale.data.shards import open_shard, read_manifest

    data = tiny_bert_dataset  # vocab 512, seq_len 64, paragraphs, 5% val (conftest)
    m = read_manifest(data)
    run_dir = tmp_path / "run"
    run_cli(["train", str(ROOT / "configs" / "bert_tiny.yaml"), f"run_dir={run_dir}", f"data.path={data}",
             "data.seq_len=64", "model.max_seq_len=64", "train.steps=600", "train.log_every=50", "train.eval_every=600",
             "optim.warmup_steps=60", "optim.lr=2e-3", "optim.min_lr=2e-4", "parallel.micro_batch_size=32",
             "parallel.global_batch_size=32"], nproc=1, timeout=900)

    # unigram baseline: always predict the most frequent token of the training split
    counts = np.zeros(m.vocab_size, dtype=np.int64)
    for s in m.shards("train"):
        counts += np.bincount(open_shard(data / s.path).tokens, minlength=m.vocab_size)
    top = int(counts.argmax())

    lm = load_model(run_dir)
    model, tok, cfg = lm.model, lm.tokenizer, lm.run_config
    assert cfg.data.nsp and model.nsp_head is not None  # bert_tiny.yaml pretrains with next-sentence prediction
    loader = build_loader(cfg.data, dp_rank=0, dp_size=1, global_batch_size=32, micro_batch_size=32,
                          pad_id=tok.pad_id, mask_id=tok.mask_id, cls_id=tok.cls_id, sep_id=tok.sep_id)
    correct = baseline = total = 0
    with torch.no_grad():
        for b in loader.eval_batches():
            out = model(b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
            sel = b["labels"] != -100
            pred = out.logits.argmax(-1)
            correct += int((pred[sel] == b["labels"][sel]).sum())
            baseline += int((b["labels"][sel] == top).sum())
            total += int(sel.sum())
    acc, base = correct / total, baseline / total
    print(f"BERT masked-LM accuracy on held-out text: {acc:.3f} over {total} masked tokens "
          f"(unigram baseline {base:.3f}, token {tok.id_to_piece(top)!r})")
    assert total > 1000
    assert acc > 3 * base and acc > base + 0.05, (acc, base)

    # next-sentence prediction on the held-out pairs, through the eval job (2 processes: the pairs are cut over
    # ranks), against the majority baseline. Half the B segments come from another document (a seeded coin).
    (tmp_path / "nsp.yaml").write_text(f"model: {run_dir}\ntasks: [nsp]\noutput_dir: {tmp_path / 'eval'}\n"
                                       f"nsp: {{dataset: {data}, seq_len: 64}}\nbatch_size: 16\n")
    run_cli(["eval", str(tmp_path / "nsp.yaml")], nproc=2, timeout=600)
    nsp = json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"]["nsp"]
    n, nsp_acc = nsp["pairs"], nsp["accuracy"]
    sigma = (0.25 / n) ** 0.5  # a coin's accuracy has std 0.5/sqrt(n)
    print(f"BERT next-sentence accuracy on {n} held-out pairs: {nsp_acc:.3f} (majority {nsp['majority_baseline']:.3f},"
          f" confusion {nsp['confusion']})")
    assert n >= 200 and 0.4 < nsp["random_next_share"] < 0.6
    assert nsp_acc > nsp["majority_baseline"] + 4 * sigma, nsp
