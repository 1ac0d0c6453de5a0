"""Bad input for `llmscale prepare`: each case gives a clear error or a counted skip, never a crash or
silent loss. Includes a 100 MB line (bounded memory, measured in a subprocess) and a prepare killed
with SIGKILL half-way and run again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from llmscale.data.prepare import prepare_dataset
from llmscale.data.shards import DatasetError, read_manifest, verify_dataset
from llmscale.data.sources import _BLOCK, PrepareError, ReadStats, iter_documents
from llmscale.data.tokenizer import Tokenizer, train_tokenizer
from llmscale.testing import cpu_env, run_cli


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory, corpus_path):
    return train_tokenizer([corpus_path], tmp_path_factory.mktemp("tok2"), vocab_size=450, sample_bytes=200_000)


def _decoded(tok, root):
    m = read_manifest(root)
    from llmscale.data.shards import open_shard

    out = []
    for split in ("train", "val"):
        for s in m.shards(split):
            v = open_shard(m.root / s.path)
            out += [tok.decode(v.document(i)[:-1]) for i in range(v.num_documents)]
    return out


def test_missing_paths_name_the_path(tmp_path, tok, corpus_path):
    with pytest.raises(PrepareError, match=r"nope\.txt does not exist"):
        prepare_dataset([corpus_path, tmp_path / "nope.txt"], tmp_path / "o", tokenizer=tok)
    with pytest.raises(PrepareError, match=r"matches no file"):
        prepare_dataset([str(tmp_path / "*.jsonl")], tmp_path / "o", tokenizer=tok)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.md5").write_text("x")
    with pytest.raises(PrepareError, match=r"empty_dir holds no \.txt"):
        prepare_dataset([tmp_path / "empty_dir"], tmp_path / "o", tokenizer=tok)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))
    proc = run_cli(["prepare", "--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o"),
                    "--tokenizer", str(tok.path.parent)], check=False)
    assert proc.returncode == 1 and "nope.txt does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_files_and_documents_are_skipped_and_counted(tmp_path, tok, corpus_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n \n")
    (tmp_path / "r.jsonl").write_text('{"text": ""}\n{"text": "   \\n "}\n{"text": "a real one"}\n')
    (tmp_path / "good.txt").write_text(corpus_path.read_text()[:20_000])
    m = prepare_dataset([tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "r.jsonl", tmp_path / "good.txt"],
                        tmp_path / "o", tokenizer=tok, seq_len=4)
    st = m.data["stats"]
    assert st["skipped_reasons"] == {"empty_file": 2, "empty": 2}
    assert st["documents_skipped"] == 4 and st["documents_read"] == st["documents_written"] + 4
    assert "a real one" in _decoded(tok, tmp_path / "o")


def test_invalid_utf8_is_replaced_nul_removed_binary_skipped(tmp_path, tok):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok\xff\xfe\n\nnul\x00here\n\nclean paragraph\n")
    rnd = bytes((i * 7919 + 13) % 256 for i in range(8000))  # mostly invalid UTF-8
    (tmp_path / "binary.txt").write_bytes(rnd.replace(b"\n", b"x"))
    st = ReadStats()
    docs = [t for _, t in iter_documents([tmp_path / "bad.txt", tmp_path / "binary.txt"], doc_split="paragraph",
                                         stats=st)]
    assert docs == ["caf\ufffd ok\ufffd\ufffd\n", "nulhere\n", "clean paragraph\n"]
    assert dict(st.repaired) == {"invalid_utf8_replaced": 1, "nul_removed": 1}
    assert dict(st.skipped) == {"binary_or_wrong_encoding": 1}
    m = prepare_dataset([tmp_path / "bad.txt", tmp_path / "binary.txt"], tmp_path / "o", tokenizer=tok,
                        doc_split="paragraph", seq_len=8)
    assert m.data["stats"]["documents_repaired"] == {"invalid_utf8_replaced": 1, "nul_removed": 1}
    assert m.data["stats"]["skipped_reasons"] == {"binary_or_wrong_encoding": 1}
    assert sorted(_decoded(tok, tmp_path / "o")) == sorted(docs)


def test_block_boundaries_do_not_break_characters_or_crlf(tmp_path):
    # a 2-byte character and a CRLF straddling the 1 MiB read blocks
    data = b"a" * (_BLOCK - 1) + "é".encode() + b"b" * (_BLOCK - 2) + b"\r\n" + "中".encode() + b"\r\n"
    (tmp_path / "x.txt").write_bytes(data)
    st = ReadStats()
    docs = [t for _, t in iter_documents([tmp_path / "x.txt"], doc_split="file", stats=st)]
    assert "".join(docs) == data.decode().replace("\r\n", "\n")
    assert not st.repaired


def test_crlf_is_normalised_lone_cr_kept(tmp_path, tok):
    (tmp_path / "w.txt").write_bytes(b"line a\r\nline b\r\n\r\nold mac\rline\r\n")
    docs = [t for _, t in iter_documents([tmp_path / "w.txt"], doc_split="paragraph")]
    assert docs == ["line a\nline b\n", "old mac\rline\n"]
    (tmp_path / "w.jsonl").write_text(json.dumps({"text": "json\r\nrecord"}) + "\n")
    assert [t for _, t in iter_documents([tmp_path / "w.jsonl"])] == ["json\nrecord"]


def test_broken_json_is_a_clear_error(tmp_path, tok):
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(PrepareError, match=r"Cannot read .*b\.jsonl as json"):
        prepare_dataset([tmp_path / "b.jsonl"], tmp_path / "o", tokenizer=tok, seq_len=2)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))


def test_corpus_smaller_than_one_sequence(tmp_path, tok):
    (tmp_path / "tiny.txt").write_text("Just a few words.\n")
    with pytest.raises(PrepareError, match=r"smaller than one training sequence.*Pass --seq-len \d+ or less"):
        prepare_dataset([tmp_path / "tiny.txt"], tmp_path / "o", tokenizer=tok, seq_len=512)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))
    with pytest.raises(PrepareError, match=r"No document to write"):
        (tmp_path / "blank.txt").write_text("\n\n")
        prepare_dataset([tmp_path / "blank.txt"], tmp_path / "o", tokenizer=tok)


def test_half_written_output_is_never_read_and_gets_replaced(tmp_path, tok, corpus_path):
    out = tmp_path / "ds"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-00000.arrow").write_bytes(b"half a shard")
    with pytest.raises(DatasetError, match="not a complete llmscale dataset"):
        read_manifest(out)
    prepare_dataset([corpus_path], out, tokenizer=tok, seq_len=64)
    assert verify_dataset(out) == []
    # an older dataset (another schema version) is neither read nor silently replaced
    mpath = out / "manifest.json"
    mpath.write_text(mpath.read_text().replace('"schema_version": 1', '"schema_version": 0'))
    with pytest.raises(DatasetError, match="schema version 0"):
        read_manifest(out)
    with pytest.raises(PrepareError, match=r"schema version 0 .*--overwrite"):
        prepare_dataset([corpus_path], out, tokenizer=tok, seq_len=64)
    prepare_dataset([corpus_path], out, tokenizer=tok, seq_len=64, overwrite=True)
    assert read_manifest(out).data["schema_version"] == 1
    # a folder holding somebody else's files is not touched without --overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(PrepareError, match=r"not an llmscale dataset \(thesis\.tex\)"):
        prepare_dataset([corpus_path], other, tokenizer=tok, seq_len=64)
    assert (other / "thesis.tex").read_text() == "precious"


def test_existing_dataset_and_another_tokenizer(tmp_path, tok, other_tok, corpus_path):
    out = tmp_path / "ds"
    prepare_dataset([corpus_path], out, tokenizer=tok, seq_len=64)
    with pytest.raises(PrepareError, match=r"already holds a complete dataset.*--overwrite"):
        prepare_dataset([corpus_path], out, tokenizer=tok, seq_len=64)
    with pytest.raises(PrepareError) as e:
        prepare_dataset([corpus_path], out, tokenizer=other_tok, seq_len=64)
    assert f"built with tokenizer hash {tok.hash}, you passed {other_tok.hash}" in str(e.value)
    assert read_manifest(out).tokenizer_hash == tok.hash  # untouched
    m = prepare_dataset([corpus_path], out, tokenizer=other_tok, seq_len=64, overwrite=True)
    assert m.tokenizer_hash == other_tok.hash and read_manifest(out).tokenizer_hash == other_tok.hash
    assert verify_dataset(out) == [] and not list(tmp_path.glob("ds.*-*"))


def test_temp_folder_of_a_running_prepare_is_respected(tmp_path, tok, corpus_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f"ds.tmp-{sleeper.pid}"
        busy.mkdir()
        with pytest.raises(PrepareError, match=rf"running `llmscale prepare` \(pid {sleeper.pid}\)"):
            prepare_dataset([corpus_path], tmp_path / "ds", tokenizer=tok, seq_len=64)
    finally:
        sleeper.kill()
        sleeper.wait()
    prepare_dataset([corpus_path], tmp_path / "ds", tokenizer=tok, seq_len=64)  # now stale: cleaned up
    assert not busy.exists()


def test_sigkill_halfway_then_rerun(tmp_path, tok, corpus_path):
    src = tmp_path / "big.txt"
    text = corpus_path.read_text()
    src.write_text("".join(text.replace("the", f"the{i}") for i in range(4)))  # ~4.5 MB
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "llmscale", "prepare", "--input", str(src), "--output", str(out), "--tokenizer",
           str(tok.path.parent), "--shard-tokens", "20000", "--num-proc", "1", "--seq-len", "64"]
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = tmp_path / f"ds.tmp-{proc.pid}"
    deadline = time.time() + 60
    try:
        while not (stage / "train" / "shard-00003.arrow").exists():
            assert proc.poll() is None, "prepare finished before it could be killed; give it more input"
            assert time.time() < deadline, "prepare wrote no shard within 60 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert stage.is_dir() and not (stage / "manifest.json").exists()
    assert not out.exists()  # nothing half-written where a dataset is expected
    with pytest.raises(DatasetError):
        read_manifest(out)
    m = prepare_dataset([src], out, tokenizer=tok, shard_tokens=20000, num_proc=1, seq_len=64)
    assert not stage.exists()  # the dead run's staging folder was removed
    assert verify_dataset(out) == []
    assert m.data["stats"]["documents_written"] == len(list(iter_documents([src])))


@pytest.mark.slow
def test_100mb_line_streams_with_bounded_memory(tmp_path):
    """A 100 MB file without a newline: memory growth stays far below the file size (measured as peak
    RSS of a fresh process, after a warm-up run has loaded every library)."""
    script = textwrap.dedent("""
        import json, resource, sys
        from pathlib import Path
        from llmscale.data.prepare import prepare_dataset
        from llmscale.data.tokenizer import train_tokenizer
        root = Path(sys.argv[1])
        unit = b"lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
        (root / "small.txt").write_bytes(unit * 30000)
        # unigram: encodes this text ~3x faster than bpe, which keeps the test short
        tok = train_tokenizer([root / "small.txt"], root / "tok", vocab_size=300, model_type="unigram")
        prepare_dataset([root / "small.txt"], root / "warm", tokenizer=tok, doc_split="file", num_proc=2)
        warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        block = unit * ((1 << 20) // len(unit))
        with open(root / "line.txt", "wb") as f:
            for _ in range(100 * (1 << 20) // len(block) + 1):
                f.write(block)
        m = prepare_dataset([root / "line.txt"], root / "ds", tokenizer=tok, doc_split="file", num_proc=2)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"warm_kb": warm, "peak_kb": peak, "size": (root / "line.txt").stat().st_size,
                          "stats": m.data["stats"], "tokens": m.num_tokens("train") + m.num_tokens("val")}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["size"] >= 100 << 20
    st = r["stats"]
    assert st["documents_read"] == 1 and st["documents_split"] == 1 and st["documents_written"] >= 100
    assert st["chars_written"] == r["size"]  # nothing lost
    growth_mb = (r["peak_kb"] - r["warm_kb"]) / 1024
    # holding the line would cost >= 100 MB as text and ~4 bytes per token as ids
    assert growth_mb < 64, f"peak RSS grew by {growth_mb:.0f} MB while reading a 100 MB line"
