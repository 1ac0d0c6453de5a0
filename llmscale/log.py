"""Rank-aware logging and progress bars.

Library code never prints: it logs through ``get_logger(__name__)``. By default only rank 0's
records reach the console; ``setup_logging(all_ranks=True)`` shows every rank, each line
prefixed with its rank.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Optional, TypeVar

_T = TypeVar("_T")
_ROOT = "llmscale"


def _env_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool) -> None:
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.ERROR


def setup_logging(*, rank: Optional[int] = None, all_ranks: bool = False, level: str | int = "INFO") -> None:
    """Configure the ``llmscale`` logger: rank 0 only (errors from every rank), or every rank."""
    rank = _env_rank() if rank is None else rank
    logger = logging.getLogger(_ROOT)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s r%(rank)d %(levelname)s] %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter(rank, all_ranks))
    logger.addHandler(handler)
    logger.setLevel(level if isinstance(level, int) else level.upper())
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    logger = logging.getLogger(name)
    if not logging.getLogger(_ROOT).handlers:
        setup_logging()
    return logger


def progress(
    iterable: Iterable[_T],
    *,
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    rank: Optional[int] = None,
    enabled: Optional[bool] = None,
) -> Iterator[_T]:
    """A tqdm bar on rank 0 when stderr is a terminal (or LLMSCALE_PROGRESS=1); plain iteration otherwise."""
    rank = _env_rank() if rank is None else rank
    if enabled is None:
        forced = os.environ.get("LLMSCALE_PROGRESS")
        enabled = forced == "1" if forced is not None else sys.stderr.isatty()
    if not enabled or rank != 0:
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
