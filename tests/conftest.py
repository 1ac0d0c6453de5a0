import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CORPUS = ROOT / "llmscale" / "corpus" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project; tests that need it skip with the reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared corpora at {SHARED_DATA} (absent on this checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    return CORPUS


# --------------------------------------------------------------------------- shared builds (read-only: copy to change)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A BPE tokenizer (vocab 500, trained on a 300 kB sample) of the bundled corpus."""
    from llmscale.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([CORPUS], out, vocab_size=500, sample_bytes=300_000)
    return out


def _tiny_dataset(tmp_path_factory, fmt: str) -> Path:
    from llmscale.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp(f"tiny-{fmt}") / "ds"
    prepare_dataset([CORPUS], out, vocab_size=512, format=fmt, seq_len=64, val_fraction=0.05,
                    doc_split="paragraph", num_proc=1)
    return out


@pytest.fixture(scope="session")
def tiny_gpt_dataset(tmp_path_factory) -> Path:
    """The bundled corpus as a GPT dataset: its own BPE tokenizer of 512 pieces, paragraphs, seq_len 64, 5% val."""
    return _tiny_dataset(tmp_path_factory, "gpt")


@pytest.fixture(scope="session")
def tiny_bert_dataset(tmp_path_factory) -> Path:
    """The same as :func:`tiny_gpt_dataset`, as a BERT dataset (sentence lengths, no eos)."""
    return _tiny_dataset(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(path, dataset=..., run_dir=..., steps=N, **sections)``: write a run config of a tiny GPT
    (2 layers, width 64, 4 heads, seq_len 64, batch 4 x 2) and return its path; each extra keyword adds a
    section, e.g. ``checkpoint={"every_steps": 5}``."""

    def write(path: Path, *, dataset: Path, run_dir: Path, steps: int, **sections: dict) -> Path:
        extra = "".join(f"{name}: {{{', '.join(f'{k}: {v}' for k, v in values.items())}}}\n"
                        for name, values in sections.items())
        path.write_text(textwrap.dedent(f"""\
            run_dir: {run_dir}
            data: {{path: {dataset}, seq_len: 64}}
            model: {{n_layers: 2, d_model: 64, n_heads: 4, max_seq_len: 64}}
            optim: {{lr: 1.0e-3, warmup_steps: 5}}
            parallel: {{micro_batch_size: 4, global_batch_size: 8}}
            train: {{steps: {steps}, log_every: 5, eval_every: 0, eval_batches: 2, tensorboard: false}}
            """) + extra)
        return path

    return write


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
