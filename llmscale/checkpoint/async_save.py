"""Asynchronous checkpoint writing for one rank: snapshot at the step boundary, write in the background.

``checkpoint.async: true`` (:class:`llmscale.checkpoint.manager.CheckpointManager`): at the save step every
rank writes its llmscale state and RNG at once (kilobytes) and hands DeepSpeed's shards to an
:class:`AsyncWriter` instead of the disk. DeepSpeed's extension point for file IO, its checkpoint engine, gets
:meth:`AsyncWriter.capture` as its ``save``: each state dict it would ``torch.save`` is copied to host memory
(:func:`snapshot`: every tensor storage once, views kept as views, so the file is the one a synchronous save
writes) and queued. Training continues; a background thread ``torch.save``s the queue into the checkpoint's
temporary folder, then hashes and fsyncs those files. The manager finishes the save at a later step
boundary once every rank's writer is done (manifest written last, rename, ``latest``), exactly as a
synchronous save does, so a crash at any moment of a background write leaves the previous checkpoint as
``latest``.

Host memory: the snapshot of a file that would take the rank past :data:`HOST_MEMORY_FRACTION` of the
available memory is written synchronously instead (logged once); the snapshot size is logged at every save.

What does not live here: when to save, the manifest, the rename and ``latest``, and how failures are agreed
between ranks (:mod:`llmscale.checkpoint.manager`).
"""
from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from llmscale.files import hash_files
from llmscale.log import get_logger

log = get_logger(__name__)

HOST_MEMORY_FRACTION = 0.8
_DELAY_ENV = "LLMSCALE_TEST_ASYNC_DELAY_S"  # test hook: the writer sleeps this long before writing
_FAIL_ENV = "LLMSCALE_TEST_ASYNC_FAIL"  # test hook: STEP[:RANK] makes that background write fail (disk full)


def available_memory() -> int:
    """Bytes of host memory available now (MemAvailable of /proc/meminfo; else total physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _storage_copy(t: Any, memo: dict, sizes: list[int]) -> Any:
    import torch

    st = t.untyped_storage()
    key = (st.device.type, st.device.index, st.data_ptr(), st.nbytes())
    new = memo.get(key)
    if new is None:
        new = torch.UntypedStorage(st.nbytes(), device="cpu")
        new.copy_(st)
        memo[key] = new
        sizes.append(st.nbytes())
    out = torch.empty(0, dtype=t.dtype).set_(new, t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def snapshot(obj: Any, memo: Optional[dict] = None, sizes: Optional[list[int]] = None) -> Any:
    """A host-memory copy of ``obj`` (nested dicts / lists / tuples of tensors and plain values) that training
    can no longer change: each tensor storage copied once, tensors that shared a storage share the copy."""
    import torch

    memo = {} if memo is None else memo
    sizes = [] if sizes is None else sizes
    if isinstance(obj, torch.Tensor):
        return _storage_copy(obj, memo, sizes)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = snapshot(v, memo, sizes)
        return out
    if isinstance(obj, list):
        return [snapshot(v, memo, sizes) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v, memo, sizes) for v in obj)
    return copy.deepcopy(obj)  # small objects (loss scaler, enums, sizes): their state at this step


def _nbytes(obj: Any, seen: set) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = (st.device.type, st.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


class AsyncWriter:
    """The background writer of one save on one rank (a new one per save)."""

    def __init__(self, *, root: Path, step: int, rank: int, crash: Callable[[str], None]) -> None:
        self.root, self.step, self.rank = Path(root), step, rank
        self._crash = crash
        self._queue: list[tuple[Any, str]] = []
        self._sync_written: list[str] = []
        self.snapshot_bytes = 0
        self._limit = int(available_memory() * HOST_MEMORY_FRACTION)
        self._warned = False
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.hashes: dict[str, dict] = {}
        self.seconds_writing = 0.0

    # ---- at the step boundary (main thread)
    def capture(self, state_dict: Any = None, path: str = "", **kwargs: Any) -> None:
        """DeepSpeed's ``checkpoint_engine.save(state_dict, path)``: snapshot now, write later."""
        import torch

        state_dict = kwargs.get("state_dict", state_dict)
        path = kwargs.get("path", path)
        need = _nbytes(state_dict, set())
        if self.snapshot_bytes + need > self._limit:
            if not self._warned:
                log.warning("async checkpoint: a host-memory snapshot of %.1f MB more would not fit (%.1f MB of host "
                            "memory may be used): writing the rest of this save synchronously.", need / 1e6,
                            self._limit / 1e6)
                self._warned = True
            torch.save(state_dict, path)
            self._sync_written.append(path)
            return
        sizes: list[int] = []
        self._queue.append((snapshot(state_dict, {}, sizes), path))
        self.snapshot_bytes += sum(sizes)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"llmscale-ckpt-writer-{self.step}", daemon=True)
        self._thread.start()

    # ---- in the background
    def _run(self) -> None:
        import torch

        t0 = time.perf_counter()
        try:
            delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
            if delay > 0:
                time.sleep(delay)
            fail = os.environ.get(_FAIL_ENV, "")
            if fail:
                parts = fail.split(":")
                if int(parts[0]) == self.step and (len(parts) < 2 or int(parts[1]) == self.rank):
                    raise OSError(28, "No space left on device (test hook)")
            rels = []
            for i, (obj, path) in enumerate(self._queue):
                torch.save(obj, path)
                rels.append(os.path.relpath(path, self.root))
                if i == 0:
                    self._crash("async_write")
            rels += [os.path.relpath(p, self.root) for p in self._sync_written]
            self._queue.clear()  # the host memory goes back as soon as the files are written
            self.hashes = hash_files(self.root, rels, fsync=True)
            self._crash("async_hashed")
        except BaseException as e:  # noqa: BLE001 - reported to every rank by the manager
            self.error = e
        finally:
            self.seconds_writing = time.perf_counter() - t0

    # ---- the manager's view
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
