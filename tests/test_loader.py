"""The loader: global order, exact resume, exactly-once coverage, masking, NSP, blends, errors, `data order`.

Datasets are written with ShardWriter directly and hold *known* tokens: the train split's tokens are
7, 8, 9, ... in order (documents back to back), so any window tells where it came from.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmscale.config import BlendEntry, ConfigError, DataConfig
from llmscale.data.collate import IGNORE
from llmscale.data.loader import build_loader
from llmscale.data.shards import DatasetError, ShardWriter, token_dtype_for, write_manifest

FIRST = 7  # first ordinary token id (0..6 are special)
VOCAB = 1 << 20  # large enough that every token of a fixture is unique (uint32 shards)


def make_dataset(root, *, docs=60, doc_len=(5, 80), kind="gpt", shard_tokens=500, vocab=VOCAB, seed=0,
                 val_docs=6, tok_hash="tok-a", start=FIRST, lengths=None) -> dict:
    """Write a dataset whose train tokens are start, start+1, ... (val continues the count).

    ``lengths`` fixes the train documents' lengths. BERT documents are cut into random sentences.
    Returns {"train": tokens, "val": tokens, "train_doc_starts": ..., "val_doc_starts": ...}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    dtype = token_dtype_for(vocab)
    splits, info = {}, {}
    counter = start
    for split, n in (("train", docs if lengths is None else len(lengths)), ("val", val_docs)):
        w = ShardWriter(root, split, dtype=dtype, shard_tokens=shard_tokens, with_sentences=(kind == "bert"))
        toks, doc_starts = [], []
        for i in range(n):
            length = int(lengths[i]) if split == "train" and lengths is not None else int(rng.integers(*doc_len))
            ids = (np.arange(counter, counter + length) - FIRST) % (vocab - FIRST) + FIRST
            doc_starts.append(sum(len(t) for t in toks))
            counter += length
            if kind == "bert":
                k = min(length - 1, int(rng.integers(0, 6)))
                cuts = np.sort(rng.choice(np.arange(1, length), size=k, replace=False)) if k > 0 else np.array([], int)
                w.add(ids, np.diff(np.concatenate([[0], cuts, [length]])).tolist())
            else:
                w.add(ids)
            toks.append(ids)
        shards = w.close()
        all_toks = np.concatenate(toks) if toks else np.zeros(0, np.int64)
        info[split] = all_toks.astype(np.int64)
        info[split + "_doc_starts"] = np.array(doc_starts, dtype=np.int64)
        splits[split] = {"num_documents": n, "num_tokens": int(all_toks.size), "num_bytes": int(all_toks.size) * 3,
                         "shards": [s.to_dict() for s in shards]}
    write_manifest(root, {
        "kind": kind, "tokenizer": {"hash": tok_hash, "vocab_size": vocab, "path": "tokenizer"},
        "token_dtype": dtype.name, "seq_len": 16, "eos_appended": kind == "gpt", "splits": splits,
        "stats": {"documents_read": docs + val_docs, "documents_written": docs + val_docs, "documents_skipped": 0,
                  "skipped_reasons": {}}, "sources": [], "args": {}})
    return info


@pytest.fixture(scope="module")
def gpt_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    return root, make_dataset(root)


@pytest.fixture(scope="module")
def bert_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    return root, make_dataset(root, kind="bert", docs=120, doc_len=(3, 60))


def loader(path, *, seq_len=16, gbs=8, mbs=2, rank=0, world=1, **cfg):
    c = DataConfig(path=str(path), seq_len=seq_len, **cfg)
    c.validate()
    return build_loader(c, dp_rank=rank, dp_size=world, global_batch_size=gbs, micro_batch_size=mbs,
                        vocab_size=VOCAB)


def take(ld, steps):
    """[(sample_ids, {key: array}) per step], micro-batches concatenated."""
    out = []
    for _ in range(steps):
        mbs = ld.next_step()
        out.append({k: torch.cat([m[k] for m in mbs]).numpy() for k in mbs[0]})
    return out


# --------------------------------------------------------------------------- order


def test_order_is_deterministic_and_a_permutation_per_epoch(gpt_ds):
    root, _ = gpt_ds
    a, b = loader(root), loader(root)
    S = a.samples_per_epoch
    steps = 3 * a.steps_per_epoch
    ids_a = np.concatenate([a.global_sample_ids(k) for k in range(steps)])
    ids_b = np.concatenate([b.global_sample_ids(k) for k in range(steps)])
    assert np.array_equal(ids_a, ids_b)
    for e in range(2):  # each epoch is a permutation of all samples, and epochs differ
        assert sorted(ids_a[e * S : (e + 1) * S].tolist()) == list(range(S))
    assert not np.array_equal(ids_a[:S], ids_a[S : 2 * S])
    assert not np.array_equal(ids_a[:S], np.arange(S))
    other = loader(root, seed=99)
    assert not np.array_equal(other.global_sample_ids(0), a.global_sample_ids(0))
    # what next_step serves is what global_sample_ids says
    got = take(a, 2)
    assert np.array_equal(got[1]["sample_ids"], a.global_sample_ids(1))
    plain = build_loader(DataConfig(path=str(root), seq_len=16), dp_rank=0, dp_size=1, global_batch_size=8,
                         micro_batch_size=8, shuffle=False)
    assert plain.global_sample_ids(1).tolist() == list(range(8, 16))


def test_ranks_concatenate_to_the_world_size_1_sequence(gpt_ds):
    root, _ = gpt_ds
    ref = take(loader(root, gbs=8, mbs=2), 4)
    for world, mbs in ((2, 2), (4, 1), (8, 1)):
        per_rank = [take(loader(root, gbs=8, mbs=mbs, rank=r, world=world), 4) for r in range(world)]
        for k in range(4):
            for key in ("sample_ids", "input_ids", "labels"):
                cat = np.concatenate([per_rank[r][k][key] for r in range(world)])
                assert np.array_equal(cat, ref[k][key]), (world, k, key)
    ld = loader(root, gbs=8, mbs=2, rank=1, world=2)
    assert np.array_equal(ld.rank_sample_ids(3, 1, 2), ld.global_sample_ids(3)[4:8])
    assert len(ld.next_step()) == 2  # 8 / 2 ranks / micro-batch 2 = 2 accumulation steps


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("offsets", ["fixed", "epoch"])
def test_gpt_every_token_exactly_once_per_epoch(gpt_ds, offsets):
    root, info = gpt_ds
    T = 16
    ld = loader(root, seq_len=T, gbs=8, mbs=4, window_offsets=offsets)
    S = ld.samples_per_epoch
    toks = info["train"]
    assert S == -(-(len(toks) - 1) // T)
    steps = take(ld, ld.steps_per_epoch + 1)
    sid = np.concatenate([s["sample_ids"] for s in steps])[:S]  # a batch may straddle two epochs
    inp = np.concatenate([s["input_ids"] for s in steps])[:S]
    lab = np.concatenate([s["labels"] for s in steps])[:S]
    starts = np.concatenate([ld.global_window_starts(k) for k in range(ld.steps_per_epoch)])[:S]
    order = np.argsort(sid)
    assert np.array_equal(sid[order], np.arange(S))
    inp, lab, starts = inp[order], lab[order], starts[order]
    shift = int(starts[0])  # every window of the epoch starts at shift + j*T
    assert np.array_equal(starts, shift + T * np.arange(S))
    assert (shift == 0) if offsets == "fixed" else (0 <= shift < T)
    assert np.array_equal(lab[lab != IGNORE], toks[shift + 1:])  # every target once (but the first shift), in order
    real_inputs = inp.reshape(-1)[: len(toks) - shift]
    assert np.array_equal(real_inputs, toks[shift:])  # windows overlap by one: inputs tile the stream
    assert np.all(inp.reshape(-1)[len(toks) - shift:] == 0)  # the last window is padded with pad_id
    assert np.array_equal(inp[:, 1:][lab[:, :-1] != IGNORE], lab[:, :-1][lab[:, :-1] != IGNORE])  # labels = next token
    # windows straddle the 500-token shard boundaries; check one that does
    k = 500 // T
    assert np.array_equal(inp[k], toks[shift + k * T : shift + (k + 1) * T])
    assert lab.dtype == np.int64 and inp.dtype == np.int64


def test_gpt_random_window_offsets_are_a_pure_function_of_seed_and_position(gpt_ds):
    """data.window_offsets=window: window j of an epoch starts at j*T + an offset in [0, T) drawn from (seed,
    stream position), as random-offset samplers (nanoGPT's) draw them; the same for any world size and on
    resume. epoch (the default): one offset per epoch. The served rows are the stream's tokens there."""
    root, info = gpt_ds
    T, toks = 16, info["train"]
    assert DataConfig().window_offsets == "epoch"
    ld = loader(root, seq_len=T, gbs=8, mbs=4, window_offsets="window")
    spe = ld.steps_per_epoch
    starts = np.concatenate([ld.global_window_starts(k) for k in range(2 * spe)])
    ids = np.concatenate([ld.global_sample_ids(k) for k in range(2 * spe)])
    off = starts - ids * T
    assert off.min() >= 0 and off.max() < T and len(np.unique(off)) == T  # every offset occurs
    S = ld.samples_per_epoch
    first, second = np.empty(S, np.int64), np.empty(S, np.int64)
    first[ids[:S]], second[ids[S:2 * S]] = off[:S], off[S:2 * S]
    assert np.mean(first != second) > 0.8  # epoch 1 does not repeat epoch 0's windows
    other = loader(root, seq_len=T, gbs=8, mbs=2, rank=1, world=2, window_offsets="window")  # same order
    assert all(np.array_equal(other.global_window_starts(k), ld.global_window_starts(k)) for k in (0, spe + 3))
    assert not np.array_equal(loader(root, seq_len=T, gbs=8, mbs=4, seed=7, window_offsets="window")
                              .global_window_starts(0) % T,
                              ld.global_window_starts(0) % T)  # another seed: other offsets
    for step in (1, spe + 1):  # served rows = the stream at those starts (rank 1 of 2 reads the second half)
        other.load_state_dict({**other.state_dict(), "consumed_samples": step * 8})
        rows = np.concatenate([m["input_ids"].numpy() for m in other.next_step()])
        for r, s0 in zip(rows, ld.global_window_starts(step)[4:]):
            real = toks[s0 : s0 + T]
            assert np.array_equal(r[: len(real)], real) and (r[len(real):] == 0).all()
    # per epoch: one offset for the whole epoch, another in the next
    ep = loader(root, seq_len=T, gbs=8, mbs=4)
    per_epoch = [np.unique(ep.global_window_starts(e * spe + 1) % T) for e in range(12)]
    assert all(len(u) == 1 for u in per_epoch) and len({int(u[0]) for u in per_epoch}) >= 6
    # a state saved with random offsets refuses a loader with other offsets (other windows), naming the option
    fixed = loader(root, seq_len=T, gbs=8, mbs=4, window_offsets="fixed")
    with pytest.raises(DatasetError, match="window_offsets"):
        fixed.load_state_dict(ld.state_dict())
    with pytest.raises(DatasetError, match="window_offsets"):
        ep.load_state_dict(ld.state_dict())


@pytest.mark.parametrize("num_tokens", [33, 34, 47])  # N - 1 a multiple of seq_len, one more, and a ragged end
def test_gpt_windows_at_the_end_of_the_split_and_across_tiny_shards(tmp_path, num_tokens):
    # 5-token documents in 5-token shards: every window spans three or four shards
    lengths = [5] * (num_tokens // 5) + ([num_tokens % 5] if num_tokens % 5 else [])
    info = make_dataset(tmp_path / "tiny", lengths=lengths, shard_tokens=5, val_docs=1)
    stream = info["train"]
    assert len(stream) == num_tokens
    c = DataConfig(path=str(tmp_path / "tiny"), seq_len=16)
    ld = build_loader(c, dp_rank=0, dp_size=1, global_batch_size=1, micro_batch_size=1, shuffle=False)
    assert len(ld.splits[0].stream.shards) == len(lengths)
    S = ld.samples_per_epoch
    assert S == -(-(num_tokens - 1) // 16)
    rows = [ld.next_step()[0] for _ in range(S)]
    inp = torch.cat([r["input_ids"] for r in rows]).numpy().reshape(-1)
    lab = torch.cat([r["labels"] for r in rows]).numpy().reshape(-1)
    assert np.array_equal(lab[lab != IGNORE], stream[1:])  # every target once
    assert (lab[num_tokens - 1 :] == IGNORE).all()
    real = min(num_tokens, S * 16)  # inputs tile the stream; the last token is an input unless N-1 = S*T
    assert np.array_equal(inp[:real], stream[:real]) and (inp[real:] == 0).all()


@pytest.mark.parametrize("shift", [0, 5, 15])
@pytest.mark.parametrize("num_tokens", [33, 47])
def test_gpt_windows_with_an_offset_across_tiny_shards_and_past_the_end(tmp_path, num_tokens, shift):
    from llmscale.data.collate import gpt_windows

    lengths = [5] * (num_tokens // 5) + ([num_tokens % 5] if num_tokens % 5 else [])
    make_dataset(tmp_path / "tiny", lengths=lengths, shard_tokens=5, val_docs=1)
    ld = build_loader(DataConfig(path=str(tmp_path / "tiny"), seq_len=16), dp_rank=0, dp_size=1, global_batch_size=1,
                      micro_batch_size=1, shuffle=False)
    stream = ld.splits[0].stream
    toks = stream.read(0, stream.num_tokens)
    S = ld.samples_per_epoch
    for samples in (np.arange(S), np.arange(S)[::-1], np.array([S - 1]), np.array([0])):
        inp, lab = gpt_windows(stream, samples, seq_len=16, pad_id=0, shift=shift)
        for r, j in enumerate(samples.tolist()):
            w = toks[j * 16 + shift : j * 16 + shift + 17]  # may be short, or empty past the end
            assert np.array_equal(inp[r, : min(len(w), 16)], w[:16]) and (inp[r, len(w):] == 0).all()
            assert np.array_equal(lab[r, : max(len(w) - 1, 0)], w[1:]) and (lab[r, max(len(w) - 1, 0):] == IGNORE).all()


# --------------------------------------------------------------------------- resume


def test_resume_mid_epoch_is_bitwise_exact_and_prefetch_changes_nothing(gpt_ds):
    root, _ = gpt_ds
    ref = take(loader(root), 12)
    first = loader(root)
    take(first, 5)
    state = first.state_dict()
    assert state["consumed_samples"] == 40 and state["step"] == 5 and len(json.dumps(state)) < 400
    resumed = loader(root, num_workers=2)  # a prefetching loader serves the same batches
    resumed.load_state_dict(json.loads(json.dumps(state)))
    got = take(resumed, 7)
    resumed.close()
    for a, b in zip(got, ref[5:]):
        for key in a:
            assert np.array_equal(a[key], b[key]), key
    # the position after an epoch boundary resumes too (12 steps * 8 > 76 samples per epoch)
    assert ref[-1]["sample_ids"].tolist() == loader(root).global_sample_ids(11).tolist()


def test_resume_on_another_dp_size_continues_the_global_sequence(gpt_ds):
    root, _ = gpt_ds
    ref = take(loader(root, gbs=8, mbs=4), 9)
    two = [loader(root, gbs=8, mbs=2, rank=r, world=2) for r in range(2)]
    for ld in two:
        take(ld, 4)
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    four = [loader(root, gbs=8, mbs=1, rank=r, world=4) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state)
    got = [take(ld, 5) for ld in four]
    for k in range(5):
        for key in ("sample_ids", "input_ids", "labels"):
            assert np.array_equal(np.concatenate([got[r][k][key] for r in range(4)]), ref[4 + k][key])


def test_resume_refuses_another_seed_or_dataset(gpt_ds, tmp_path):
    root, _ = gpt_ds
    state = loader(root).state_dict()
    with pytest.raises(DatasetError, match="data.seed=1234"):
        loader(root, seed=5).load_state_dict(state)
    make_dataset(tmp_path / "other", docs=70)
    with pytest.raises(DatasetError, match="different dataset"):
        loader(tmp_path / "other").load_state_dict(state)


# --------------------------------------------------------------------------- BERT


def _bert_rows(root, *, steps, **kw):
    ld = loader(root, format="bert", seq_len=32, gbs=16, mbs=8, **kw)
    return ld, take(ld, steps)


def test_bert_structure_and_exact_coverage(bert_ds):
    root, info = bert_ds
    ld, steps = _bert_rows(root, steps=1)
    S = ld.samples_per_epoch
    steps += take(ld, ld.steps_per_epoch)
    cat = {k: np.concatenate([s[k] for s in steps])[:S] for k in steps[0]}
    order = np.argsort(cat["sample_ids"])
    assert np.array_equal(cat["sample_ids"][order], np.arange(S))
    ids, lab, tti, att = (cat[k][order] for k in ("input_ids", "labels", "token_type_ids", "attention_mask"))
    original = np.where(lab != IGNORE, lab, ids)
    pieces = []
    for r in range(S):
        n = int(att[r].sum())
        row, types = original[r, :n], tti[r, :n]
        assert row[0] == 4 and row[n - 1] == 5 and (row == 5).sum() == 2  # [CLS] A [SEP] B [SEP]
        sep = int(np.flatnonzero(row == 5)[0])
        assert np.all(types[: sep + 1] == 0) and np.all(types[sep + 1 :] == 1)
        assert np.all(ids[r, n:] == 0) and np.all(lab[r, n:] == IGNORE) and np.all(tti[r, n:] == 0)
        assert n <= 32
        pieces += [row[1:sep], row[sep + 1 : n - 1]]
    assert np.array_equal(np.concatenate(pieces), info["train"])  # the samples tile every document once
    # A/B boundaries fall on the documents' sentence boundaries only when the sample has several sentences;
    # and segments never cross a document boundary
    starts = set(info["train_doc_starts"].tolist())
    pos = 0
    for r in range(S):
        row = original[r, : int(att[r].sum())]
        sep = int(np.flatnonzero(row == 5)[0])
        length = int(att[r].sum()) - 3
        inside = [p for p in starts if pos < p < pos + length]
        assert not inside, f"sample {r} crosses a document boundary"
        pos += length


def test_bert_masking_statistics(bert_ds):
    root, _ = bert_ds
    ld, steps = _bert_rows(root, steps=60)  # 960 samples, about 20k content tokens
    ids = np.concatenate([s["input_ids"] for s in steps])
    lab = np.concatenate([s["labels"] for s in steps])
    att = np.concatenate([s["attention_mask"] for s in steps])
    original = np.where(lab != IGNORE, lab, ids)
    structural = (original == 4) | (original == 5) | (att == 0)
    content = ~structural
    selected = lab != IGNORE
    assert not (selected & structural).any()  # [CLS], [SEP] and padding are never masked
    frac = selected.sum() / content.sum()
    assert 0.14 < frac < 0.16, frac
    sel_ids, sel_orig = ids[selected], lab[selected]
    n = selected.sum()
    masked = (sel_ids == 6).mean()
    unchanged = (sel_ids == sel_orig).mean()
    randomised = 1 - masked - unchanged
    assert 0.78 < masked < 0.82 and 0.085 < unchanged < 0.115 and 0.085 < randomised < 0.115, (masked, unchanged, n)
    rand_tokens = sel_ids[(sel_ids != 6) & (sel_ids != sel_orig)]
    assert rand_tokens.min() >= 7 and rand_tokens.max() < VOCAB  # random replacements are never special tokens
    assert ((ids == 6) == ((lab != IGNORE) & (ids == 6))).all()  # [MASK] only where a label is
    # masks are dynamic (a sample seen again in a later epoch gets another mask) but reproducible from the seed
    sid = np.concatenate([s["sample_ids"] for s in steps])
    S = ld.samples_per_epoch
    assert np.array_equal(np.sort(sid[:S]), np.sort(sid[S : 2 * S]))
    second = {int(x): i for i, x in enumerate(sid[S : 2 * S].tolist(), start=S)}
    differ = sum(not np.array_equal(ids[i], ids[second[int(sid[i])]]) for i in range(S))
    assert differ > 0.9 * S
    ld2, again = _bert_rows(root, steps=1)
    assert np.array_equal(again[0]["input_ids"], steps[0]["input_ids"])


def test_nsp_labels_are_balanced_and_true(bert_ds):
    root, info = bert_ds
    ld, steps = _bert_rows(root, steps=40, nsp=True)
    nsp = np.concatenate([s["next_sentence_label"] for s in steps])
    ids = np.concatenate([s["input_ids"] for s in steps])
    lab = np.concatenate([s["labels"] for s in steps])
    assert 0.45 < nsp.mean() < 0.55, nsp.mean()
    original = np.where(lab != IGNORE, lab, ids)
    doc_of = lambda tok: int(np.searchsorted(info["train_doc_starts"], int(tok) - FIRST, side="right")) - 1  # noqa: E731
    checked = 0
    for r in range(len(nsp)):
        row = original[r]
        seps = np.flatnonzero(row == 5)
        a_last, b_first = row[seps[0] - 1], row[seps[0] + 1]
        if seps[1] == seps[0] + 1 or seps[0] == 1:
            continue  # an empty segment
        checked += 1
        if nsp[r] == 0:
            assert b_first == a_last + 1  # the true continuation
        else:
            assert doc_of(b_first) != doc_of(a_last)  # a segment of another document
    assert checked > 500


def test_prefetch_and_evaluation_interleaved_change_nothing(bert_ds):
    root, _ = bert_ds
    plain = loader(root, format="bert", seq_len=32, gbs=16, mbs=8, nsp=True)
    ref = take(plain, 6)
    ref_eval = [b["input_ids"] for b in plain.eval_batches()]
    busy = loader(root, format="bert", seq_len=32, gbs=16, mbs=8, nsp=True, num_workers=2)
    for k in range(6):  # evaluation runs while the prefetch threads prepare the next training steps
        got = take(busy, 1)[0]
        assert all(np.array_equal(got[key], ref[k][key]) for key in got), k
        ev = [b["input_ids"] for b in busy.eval_batches()]
        assert len(ev) == len(ref_eval) and all(torch.equal(a, b) for a, b in zip(ev, ref_eval))
    busy.close()


# --------------------------------------------------------------------------- blends


def test_blend_respects_weights_and_reads_each_dataset_epoch_by_epoch(tmp_path):
    make_dataset(tmp_path / "a", docs=60, start=FIRST)
    make_dataset(tmp_path / "b", docs=40, start=500_000, seed=1)
    cfg = DataConfig(blend=[BlendEntry(str(tmp_path / "a"), 3.0), BlendEntry(str(tmp_path / "b"), 1.0)], seq_len=16)
    ld = build_loader(cfg, dp_rank=0, dp_size=1, global_batch_size=16, micro_batch_size=8)
    Sa = ld.splits[0].num_samples
    steps = take(ld, 256)  # 4096 samples = 4 blend blocks
    sid = np.concatenate([s["sample_ids"] for s in steps])
    from_a = sid < Sa
    assert abs(from_a.mean() - 0.75) < 0.002, from_a.mean()
    assert abs(from_a[:1024].mean() - 0.75) < 0.002  # exact within every block of 1024
    ia, ib = sid[from_a], sid[~from_a] - Sa
    Sb = ld.splits[1].num_samples
    assert sorted(ia[:Sa].tolist()) == list(range(Sa)) and sorted(ib[:Sb].tolist()) == list(range(Sb))
    inp = np.concatenate([s["input_ids"] for s in steps])
    first = inp[:, 0]
    real = first != 0  # a window whose random offset lies past its split's end is all padding
    assert real.mean() > 0.99
    assert (first[~from_a & real] >= 500_000).all() and (first[from_a & real] < 500_000).all()
    # reproducible and resumable
    ld2 = build_loader(cfg, dp_rank=0, dp_size=1, global_batch_size=16, micro_batch_size=8)
    ld2.load_state_dict({**ld.state_dict(), "consumed_samples": 16 * 100})
    assert np.array_equal(take(ld2, 1)[0]["input_ids"], steps[100]["input_ids"])


def test_blend_of_different_tokenizers_is_refused(tmp_path):
    make_dataset(tmp_path / "a", tok_hash="aaaa1111")
    make_dataset(tmp_path / "b", tok_hash="bbbb2222")
    cfg = DataConfig(blend=[BlendEntry(str(tmp_path / "a"), 1.0), BlendEntry(str(tmp_path / "b"), 1.0)], seq_len=16)
    with pytest.raises(DatasetError, match="aaaa1111.*bbbb2222"):
        build_loader(cfg, dp_rank=0, dp_size=1, global_batch_size=8, micro_batch_size=8)


# --------------------------------------------------------------------------- errors, eval, CLI


def test_clear_errors(gpt_ds, bert_ds, tmp_path):
    root, _ = gpt_ds
    with pytest.raises(ConfigError,
                       match=r"not divisible by dp_size\*micro_batch_size=2\*4=8; use global_batch_size 8 or 16"):
        loader(root, gbs=12, mbs=4, world=2)
    with pytest.raises(DatasetError, match="llmscale prepare --format bert"):
        loader(root, format="bert")
    with pytest.raises(DatasetError, match="llmscale prepare --format gpt"):
        loader(bert_ds[0], format="gpt")
    with pytest.raises(DatasetError, match="fewer than one global batch of 4096"):
        loader(root, gbs=4096, mbs=1)
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(DatasetError, match="no manifest.json"):
        loader(tmp_path / "nomanifest")
    make_dataset(tmp_path / "noval", val_docs=0)
    with pytest.raises(DatasetError, match="'val' split .* is empty"):
        c = DataConfig(path=str(tmp_path / "noval"), seq_len=16)
        build_loader(c, split="val", dp_rank=0, dp_size=1, global_batch_size=1, micro_batch_size=1)


def test_eval_batches_cover_val_once_across_ranks(gpt_ds):
    root, info = gpt_ds
    world, mbs = 2, 3
    per_rank = [list(loader(root, gbs=6, mbs=mbs, rank=r, world=world).eval_batches()) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    labels = []
    for k in range(len(per_rank[0])):
        for r in range(world):
            b = per_rank[r][k]
            assert b["input_ids"].shape == (mbs, 16)
            labels.append(b["labels"].numpy())
    lab = np.concatenate(labels)
    assert np.array_equal(lab[lab != IGNORE], info["val"][1:])  # every val target once, in order
    again = list(loader(root, gbs=6, mbs=mbs, rank=0, world=world).eval_batches(max_batches=2))
    assert len(again) == 2 and torch.equal(again[1]["input_ids"], per_rank[0][1]["input_ids"])


def test_order_command_prints_each_ranks_ids(gpt_ds, capsys):
    from llmscale.cli import main

    root, _ = gpt_ds
    rc = main(["data", "order", str(root), "--world-size", "4", "--global-batch", "8", "--steps", "3",
               "--start-step", "2", "--seq-len", "16"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    ld = loader(root)
    assert [s["step"] for s in out["steps"]] == [2, 3, 4]
    for s in out["steps"]:
        assert len(s["ranks"]) == 4 and all(len(r) == 2 for r in s["ranks"])
        assert sum(s["ranks"], []) == ld.global_sample_ids(s["step"]).tolist()
    assert main(["data", "order", str(root), "--world-size", "3", "--global-batch", "8", "--steps", "1"]) == 2


# --------------------------------------------------------------------------- a real prepared corpus


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory, corpus_path):
    from llmscale.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("shakespeare")
    gpt = prepare_dataset([corpus_path], root / "gpt", vocab_size=600, seq_len=64, val_fraction=0.05, num_proc=1,
                          doc_split="paragraph", shard_tokens=40_000)
    bert = prepare_dataset([corpus_path], root / "bert", tokenizer=gpt.tokenizer_dir(), format="bert", seq_len=64,
                           val_fraction=0.05, num_proc=1, doc_split="paragraph", shard_tokens=40_000)
    return gpt, bert, corpus_path.read_text(encoding="utf-8")


def test_real_prepared_gpt_dataset_is_served_whole(shakespeare):
    from llmscale.data.shards import open_shard
    from llmscale.data.tokenizer import Tokenizer

    gpt, _, text = shakespeare
    assert len(gpt.shards("train")) > 1  # windows cross shard boundaries
    tok = Tokenizer.load(gpt.tokenizer_dir())
    stream = np.concatenate([open_shard(gpt.root / s.path).tokens for s in gpt.shards("train")]).astype(np.int64)
    c = DataConfig(path=str(gpt.root), seq_len=64)  # one offset per epoch (the default): every target once
    ld = build_loader(c, dp_rank=0, dp_size=1, global_batch_size=32, micro_batch_size=16, vocab_size=tok.vocab_size)
    S = ld.samples_per_epoch
    steps = take(ld, ld.steps_per_epoch)
    sid = np.concatenate([s["sample_ids"] for s in steps])[:S]
    lab = np.concatenate([s["labels"] for s in steps])[:S][np.argsort(sid)]
    shift = int(ld.global_window_starts(0)[0] % 64)  # epoch 0's window shift (data.window_shift)
    assert np.array_equal(lab[lab != IGNORE], stream[shift + 1:])
    window = steps[0]["input_ids"][0].tolist()
    pieces = [tok.decode(p) for p in np.split(window, np.flatnonzero(np.array(window) == tok.eos_id))]
    assert all(p.replace("</s>", "") in text for p in pieces if p)  # windows are real, losslessly decoded text
    val = list(ld.eval_batches())
    assert val and sum(int((b["labels"] != IGNORE).sum()) for b in val) == ld.val_num_tokens - 1


def test_real_prepared_bert_dataset(shakespeare):
    from llmscale.data.tokenizer import Tokenizer

    _, bert, text = shakespeare
    tok = Tokenizer.load(bert.tokenizer_dir())
    c = DataConfig(path=str(bert.root), format="bert", seq_len=64, nsp=True)
    ld = build_loader(c, dp_rank=0, dp_size=1, global_batch_size=64, micro_batch_size=32, vocab_size=tok.vocab_size,
                      pad_id=tok.pad_id, mask_id=tok.mask_id, cls_id=tok.cls_id, sep_id=tok.sep_id)
    steps = take(ld, 8)
    ids, lab, att = (np.concatenate([s[k] for s in steps]) for k in ("input_ids", "labels", "attention_mask"))
    nsp = np.concatenate([s["next_sentence_label"] for s in steps])
    original = np.where(lab != IGNORE, lab, ids)
    content = (att == 1) & (original != tok.cls_id) & (original != tok.sep_id)
    assert 0.12 < (lab != IGNORE).sum() / content.sum() < 0.18
    assert 0.4 < nsp.mean() < 0.6
    row = original[0, : int(att[0].sum())]
    sep = int(np.flatnonzero(row == tok.sep_id)[0])
    assert tok.decode(row[1:sep].tolist()) in text  # segment A is real text


def test_bench_data_loader_and_open_parts(gpt_ds, tmp_path):
    from llmscale.bench.data import bench_loader, bench_open

    root, info = gpt_ds
    res = bench_loader(root, seq_len=16, micro_batch=2, global_batch=8, rounds=1, num_workers=1)
    assert res["train_tokens"] == len(info["train"]) and res["loader_tokens_per_s"] > 0
    # ratio is rounded to 4 decimals: its error is at most 5e-5, however small the ratio is
    assert res["ratio"] == pytest.approx(res["loader_tokens_per_s"] / res["raw_read_tokens_per_s"], rel=1e-3, abs=5e-5)
    assert res["loader_tokens_per_s_num_workers_1"] > 0
    opened = bench_open(tmp_path, shards=10, rounds=1)
    assert opened["shards"] == 10 and 0 < opened["open_s"] < 10
