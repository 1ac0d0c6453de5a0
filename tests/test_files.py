"""One verifier for every folder with a manifest (llmscale.files.verify_listed_files): datasets get the same
unlisted-file and path-escape checks as checkpoints."""
from __future__ import annotations

import json

import pytest

from llmscale.data.shards import read_manifest, verify_dataset
from llmscale.files import escapes, hash_files, verify_listed_files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus_path):
    from llmscale.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("files") / "ds"
    prepare_dataset([corpus_path], out, vocab_size=512, format="gpt", seq_len=64, val_fraction=0.1,
                    doc_split="paragraph", num_proc=1)
    return out


def test_dataset_planted_file_and_escaping_path_are_reported(dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    assert verify_dataset(ds) == []
    (ds / "train" / "shard-99999.arrow").write_bytes(b"planted")
    assert any("shard-99999.arrow: file not listed in the manifest" in p for p in verify_dataset(ds))
    (ds / "train" / "shard-99999.arrow").unlink()
    # a manifest that points outside the folder is refused without opening the file
    outside = tmp_path / "secret.arrow"
    outside.write_bytes(b"x" * 10)
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["path"] = "../secret.arrow"
    (ds / "manifest.json").write_text(json.dumps(m))
    problems = verify_dataset(ds)
    assert any("lists a path outside" in p and "../secret.arrow" in p for p in problems), problems
    assert read_manifest(ds).shards("train")[0].path == "../secret.arrow"


def test_listed_files_sizes_checksums_and_shards(tmp_path):
    (tmp_path / "a").mkdir()
    for name, data in (("a/x.bin", b"1234"), ("a/y.bin", b"abcdef"), ("z.bin", b"")):
        (tmp_path / name).write_bytes(data)
    files = hash_files(tmp_path, ["a/x.bin", "a/y.bin", "z.bin"])
    assert files["a/x.bin"]["size"] == 4 and verify_listed_files(tmp_path, files) == []
    (tmp_path / "a" / "y.bin").write_bytes(b"abcdeX")  # same size, other bytes
    assert [p for p in verify_listed_files(tmp_path, files) if "sha256 mismatch" in p and "y.bin" in p]
    assert verify_listed_files(tmp_path, files, checksums=False) == []
    (tmp_path / "z.bin").unlink()
    # split over 2 "ranks": together they find every problem, each only its share
    both = verify_listed_files(tmp_path, files, shard=(0, 2)) + verify_listed_files(tmp_path, files, shard=(1, 2))
    assert sorted(both) == sorted(verify_listed_files(tmp_path, files))
    assert escapes("../x") and escapes("/etc/passwd") and escapes("a/../../x") and not escapes("a/b.bin")
