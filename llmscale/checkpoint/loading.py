"""Finding a checkpoint to resume and reading it back, the other half of :class:`CheckpointManager`
(:class:`LoadingMixin`; saving, retention and the best pointer stay in :mod:`.manager`).

* :meth:`LoadingMixin.find_resumable`: the newest checkpoint that verifies, damaged ones set aside loudly;
  verification split over the ranks;
* :meth:`LoadingMixin.load`: the saved layout read directly, another layout through the universal format
  (:mod:`.universal`); on the saved layout with ZeRO 0-2 each file is read from the disk once
  (:class:`VerifiedReader`: mapped, hashed, compared, then unpickled with ``mmap=True`` from the same pages);
  damage found there raises :class:`DamagedCheckpoint` on every rank and :meth:`LoadingMixin.resume` falls
  back to the older checkpoint;
* :meth:`LoadingMixin.rollback` after repeated non-finite steps.

Every wait for the other ranks is bounded (``self._waiting``: train.wait_timeout_s).
What does not live here: the folder layout and manifest (:mod:`.store`), when to save (:mod:`.manager`).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from llmscale import dist as ldist
from llmscale.checkpoint import codec
from llmscale.checkpoint.safe_load import REFUSED
from llmscale.checkpoint.store import (
    CHECKPOINTS,
    ENGINE_DIR,
    LATEST,
    MANIFEST,
    STATE_DIR,
    CheckpointInfo,
    children,
    clean_stale,
    latest_complete,
    layout_dict,
    list_checkpoints,
    parse_step,
    read_latest,
    read_manifest,
    set_aside_corrupt,
    verify_checkpoint,
)
from llmscale.checkpoint.universal import load_through_universal, needs_universal
from llmscale.errors import CheckpointError
from llmscale.log import get_logger

log = get_logger(__name__)


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest, found while loading it (``problems``: one line each)."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems



class VerifiedReader:
    """Reads the files of one checkpoint for DeepSpeed's checkpoint engine, each from the disk once: the file is
    mapped and hashed (:func:`llmscale.files.sha256_mapped`; read-ahead overlaps the disk with the hash), compared
    with the manifest, and only then unpickled through the restricted unpickler with ``mmap=True``, which takes
    its tensors from the same pages in the page cache. A mismatch raises :class:`CheckpointError` before
    anything of that file is unpickled. ``read`` lists what this process read (the others are hashed after)."""

    def __init__(self, ckpt: Path, files: dict[str, dict]) -> None:
        self.ckpt = Path(ckpt)
        self.files = files
        self.read: set[str] = set()

    def load(self, path: str | os.PathLike, map_location: Any = None) -> Any:
        from llmscale.checkpoint.safe_load import restricted_load
        from llmscale.files import sha256_mapped

        p = Path(path)
        try:
            rel = p.resolve().relative_to(self.ckpt.resolve()).as_posix()
        except ValueError:
            raise CheckpointError(f"DeepSpeed asked for {p}, outside checkpoint {self.ckpt}: refused.") from None
        want = self.files.get(rel)
        if want is None:
            raise CheckpointError(f"DeepSpeed asked for {p}, which {MANIFEST} does not list: refused.")
        try:
            digest = sha256_mapped(p, int(want["size"]))
        except OSError as e:
            raise CheckpointError(str(e)) from None
        if digest != want["sha256"]:
            raise CheckpointError(f"{p}: sha256 mismatch with the manifest (damaged since it was saved); "
                                  f"nothing of it was unpickled")
        self.read.add(rel)
        try:
            return restricted_load(p, map_location=map_location, mmap=True)
        except RuntimeError as e:  # a file in torch's legacy (non-zip) format cannot be mapped: read it plainly
            if "mmap" not in str(e):
                raise
            return restricted_load(p, map_location=map_location)


class LoadingMixin:
    """Find and load, for :class:`llmscale.checkpoint.manager.CheckpointManager` (which provides ``rank``,
    ``world_size``, ``dir``, ``run_dir``, ``cfg``, ``_waiting``, ``wait`` and the bookkeeping attributes)."""

    # ---------------------------------------------------------------- find
    def latest_complete(self) -> Optional[CheckpointInfo]:
        return latest_complete(self.dir)

    def _verify_collective(self, ckpt: Path, deferred: Any = None) -> list[str]:
        """verify_checkpoint with the hashing split over all ranks; every rank gets the full list. ``deferred``:
        files only size-checked here because the load hashes them as it reads them (:meth:`_read_once`)."""
        mine = verify_checkpoint(ckpt, shard=(self.rank, self.world_size), deferred=deferred or (lambda rel: False))
        out: list[str] = []
        with self._waiting(f"verifying {ckpt}: the other ranks' checksums of their share of the files"):
            gathered = ldist.all_gather_object(mine)
        for part in gathered:
            out.extend(part)
        return list(dict.fromkeys(out))  # a missing manifest is reported by every rank: keep one copy

    def _read_once(self, ckpt: Path, engine: Any) -> Any:
        """For a load that can read each file once: a predicate of the files whose checksums the load itself
        checks as it reads them (DeepSpeed's files: :class:`VerifiedReader`), else None (everything is hashed
        first). Only on the saved layout with ZeRO 0-2: a universal conversion reads the files in another
        process, and a ZeRO-3 load gathers inside DeepSpeed, where a rank that finds damage would leave the
        others waiting (bounded, but not a clean fall-back to an older checkpoint)."""
        if engine is None or not hasattr(engine, "layout"):
            return None
        try:
            m = read_manifest(ckpt)
        except CheckpointError:
            return None
        current = layout_dict(engine.layout)
        if needs_universal(m["layout"], current) or current["zero_stage"] >= 3 or m["layout"] != current:
            return None
        prefix = ENGINE_DIR + "/"
        return lambda rel: rel.startswith(prefix)

    def find_resumable(self, engine: Any = None) -> Optional[Path]:
        """Newest checkpoint that verifies (collective). Damaged ones are reported loudly and set aside. With
        ``engine``, the files its load will hash as it reads them are only size-checked here (:meth:`_read_once`)."""
        infos = None
        if self.rank == 0:
            clean_stale(self.dir)
            infos = list_checkpoints(self.dir)
            latest = read_latest(self.dir)
            if latest and latest not in {i.name for i in infos}:
                log.warning("%s names %s, which does not exist: scanning for the newest complete checkpoint.",
                            self.dir / LATEST, latest)
        with self._waiting(f"resuming: rank 0's list of the checkpoints in {self.dir}"):
            infos = ldist.broadcast_object(infos)
        if not infos:
            return None
        failures = []
        for info in reversed(infos):
            problems = self._verify_collective(info.path, self._read_once(info.path, engine))
            if not problems:
                if failures or self._fell_back:
                    log.warning("resuming from %s, an OLDER checkpoint, because newer ones are damaged (see above)",
                                info.name)
                return info.path
            refused = [p for p in problems if REFUSED in p]
            if refused:  # not damage: a forged or foreign file. Stop (all ranks), keep it in place, say how to proceed
                raise CheckpointError(f"{info.path} was not loaded: {refused[0]}")
            failures.append((info, problems))
            log.error("CHECKPOINT %s IS DAMAGED and will not be loaded:\n  %s", info.path, "\n  ".join(problems[:10]))
            if self.rank == 0:
                set_aside_corrupt(info)
            with self._waiting(f"resuming: rank 0 setting damaged {info.name} aside"):
                ldist.barrier()
        raise CheckpointError(
            f"{self.dir} has {len(infos)} checkpoint(s) and none is usable: "
            + "; ".join(f"{i.name}: {p[0]}" for i, p in failures[:3])
            + ". Refusing to start over silently. Restore a good copy, pass --resume-from PATH, or start afresh "
              "with --no-resume (the old checkpoints are kept aside).")

    # ---------------------------------------------------------------- load
    def resume(self, engine: Any, stateful: dict[str, Any], *, resume_from: str | Path | None = None,
               no_resume: bool = False) -> Optional[int]:
        """Continue from the newest complete checkpoint of the run directory (or ``resume_from``). Returns the
        step resumed at, or None for a fresh start. Collective."""
        if no_resume:
            if self.rank == 0 and any(parse_step(c.name) is not None for c in children(self.dir)):
                aside = self.run_dir / f"{CHECKPOINTS}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(self.dir, aside)
                log.warning("--no-resume: starting from scratch; the existing checkpoints were moved to %s", aside)
            with self._waiting("--no-resume: rank 0 moving the old checkpoints aside"):
                ldist.barrier()
            return None
        if resume_from is not None:
            path = self._explicit(Path(resume_from))
            deferred = self._read_once(path, engine)
            problems = self._verify_collective(path, deferred)
            if problems:
                raise CheckpointError(f"--resume-from {path}: the checkpoint is damaged: " + "; ".join(problems[:5]))
            return self.load(path, engine, stateful, verified=True, deferred=deferred)
        while True:
            path = self.find_resumable(engine)
            if path is None:
                log.info("no checkpoint in %s: starting from scratch", self.dir)
                return None
            try:
                return self.load(path, engine, stateful, verified=True, deferred=self._read_once(path, engine))
            except DamagedCheckpoint as e:  # found while reading: set aside like any damaged one, try the older
                log.error("CHECKPOINT %s IS DAMAGED and was not used (found while loading it):\n  %s", path,
                          "\n  ".join(e.problems[:10]))
                if self.rank == 0:
                    for info in list_checkpoints(self.dir):
                        if info.path == path:
                            set_aside_corrupt(info)
                with self._waiting(f"resuming: rank 0 setting damaged {path.name} aside"):
                    ldist.barrier()
                self._fell_back = True

    def _load_read_once(self, ckpt: Path, m: dict, engine: Any, deferred: Any) -> dict:
        """DeepSpeed's load through a :class:`VerifiedReader` (each file read once, hashed as read, unpickled only
        after its checksum matched); then the deferred files no rank read are hashed, split over the ranks.
        Every rank learns every rank's outcome: damage raises :class:`DamagedCheckpoint` everywhere."""
        from llmscale.files import sha256_file

        reader = VerifiedReader(ckpt, m["files"])
        client, failure = {}, None
        try:
            with self._waiting(f"loading {ckpt}: DeepSpeed's load (each rank reads its shards; barriers inside)"):
                client = engine.load(ckpt / ENGINE_DIR, universal=False, read_file=reader.load)
        except CheckpointError as e:
            failure = ("damaged", f"rank {self.rank}: {e}")
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
            failure = ("error", f"rank {self.rank}: {type(e).__name__}: {e}")
        with self._waiting(f"loading {ckpt}: the other ranks' reports of the files they read"):
            reports = ldist.all_gather_object((failure, sorted(reader.read)))
        failures = [f for f, _ in reports if f]
        problems = [msg for kind, msg in failures if kind == "damaged"]
        if failures and not problems:
            raise CheckpointError(f"loading {ckpt} failed: " + "; ".join(msg for _, msg in failures[:3]))
        if not problems:
            done = {rel for _, rels in reports for rel in rels}
            rest = [rel for rel in sorted(m["files"]) if deferred(rel) and rel not in done]
            mine = [f"{ckpt / rel}: sha256 mismatch with the manifest (damaged since it was saved)"
                    for i, rel in enumerate(rest) if i % self.world_size == self.rank
                    and sha256_file(ckpt / rel) != m["files"][rel]["sha256"]]
            with self._waiting(f"loading {ckpt}: the other ranks' checksums of the files nobody read"):
                problems = [p for part in ldist.all_gather_object(mine) for p in part]
        if problems:
            raise DamagedCheckpoint(f"{ckpt} is damaged: " + "; ".join(problems[:3]), problems)
        return client

    def _explicit(self, p: Path) -> Path:
        if (p / MANIFEST).is_file():
            return p
        info = latest_complete(p)
        if info is None:
            raise CheckpointError(f"--resume-from {p}: neither a checkpoint (no {MANIFEST}) nor a run/checkpoints "
                                  f"folder holding one. `llmscale ckpt list {p}` shows what is there.")
        return info.path

    def load(self, ckpt: str | Path, engine: Any, stateful: dict[str, Any], *, verified: bool = False,
             keep: Iterable[str] = (), deferred: Any = None) -> int:
        """Load checkpoint ``ckpt`` into ``engine`` and ``stateful`` (except the names in ``keep``); reshards
        through the universal format when the layout differs. Returns its step. Collective. ``deferred``: the
        files whose checksums are checked as DeepSpeed reads them (each read once); a mismatch raises
        :class:`DamagedCheckpoint` on every rank."""
        from llmscale.rng import load_rng_state, restore_rng_state

        ckpt = Path(ckpt)
        if not verified:
            problems = self._verify_collective(ckpt)
            if problems:
                raise CheckpointError(f"{ckpt} is damaged: " + "; ".join(problems[:5]))
        m = read_manifest(ckpt)
        saved, current = m["layout"], layout_dict(engine.layout)
        t0 = time.perf_counter()
        if needs_universal(saved, current):
            client = load_through_universal(ckpt, m, engine, rank=self.rank, wait=self._waiting)
        elif deferred is not None:
            client = self._load_read_once(ckpt, m, engine, deferred)
        else:
            with self._waiting(f"loading {ckpt}: DeepSpeed's load (each rank reads its shards; barriers inside)"):
                client = engine.load(ckpt / ENGINE_DIR, universal=False)
        step = int(m["step"])
        if client.get("llmscale_step", step) != step:
            raise CheckpointError(f"{ckpt}: DeepSpeed's state is from step {client.get('llmscale_step')}, the manifest "
                                  f"says {step}: the folder mixes two checkpoints.")
        # llmscale state: the same rank's files on the same layout; rank 0's otherwise (rank-independent state)
        rank = self.rank
        same = saved == current and m.get("world_size") == self.world_size
        states = codec.load_state_files(ckpt / STATE_DIR / f"rank-{rank if same else 0:05d}")
        keep = set(keep)
        for k, obj in stateful.items():
            if k in keep:
                continue
            if k not in states:
                raise CheckpointError(f"{ckpt} holds no state for {k!r} (it has {sorted(states)}): written by a "
                                      f"different trainer version? Resume with --no-resume to start afresh.")
            obj.load_state_dict(states[k])
        rng_src = rank if (ckpt / STATE_DIR / f"rng-rank-{rank:05d}.json").is_file() else 0
        restore_rng_state(*load_rng_state(ckpt / STATE_DIR / f"rng-rank-{rng_src:05d}"))
        with self._waiting(f"loading {ckpt}: every rank's llmscale state"):
            ldist.barrier()
        self.loaded = ckpt
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        log.info("loaded checkpoint %s (step %d) in %.2fs", ckpt, step, time.perf_counter() - t0)
        return step

    def rollback(self, engine: Any, stateful: dict[str, Any], *, keep: Iterable[str] = ("loader",)) -> int:
        """After repeated non-finite steps: reload the newest complete checkpoint into ``engine`` and
        ``stateful`` except ``keep`` (default the loader, which has already moved past the offending batches,
        so they are skipped). Returns the step rolled back to. Collective."""
        self.wait()
        path = self.find_resumable()
        if path is None:
            raise CheckpointError(
                f"rollback requested after {getattr(self.cfg, 'train', None) and self.cfg.train.max_bad_steps} bad "
                f"steps in a row, but {self.dir} holds no checkpoint. Set checkpoint.every_steps (or "
                f"train.max_bad_steps=0 to never roll back).")
        step = self.load(path, engine, stateful, verified=True, keep=keep)
        log.warning("rolled back to %s (step %d); the loader keeps its position, so the bad batches are skipped",
                    path.name, step)
        return step

