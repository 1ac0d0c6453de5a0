"""When and how a run saves and resumes: :class:`CheckpointManager`, collective on every rank.

Saving writes everything under ``.tmp-step-000200``; once every rank is done the files are hashed, rank 0
writes the manifest, renames the folder to ``step-000200`` and switches ``latest`` (DeepSpeed's own
``latest`` is never used). The folder must be one every rank sees (a shared filesystem).

Safety: nothing is handed to DeepSpeed before every file of the checkpoint matched the manifest's checksums,
no unlisted file sits beside them, and no pickle asks for a global outside the allowlist; DeepSpeed then
reads its files through torch's restricted unpickler (:mod:`llmscale.checkpoint.safe_load`), so even a
forged checkpoint with a rewritten manifest cannot run code. A damaged newest checkpoint is set aside and
an older one resumed; a refused pickle stops the run instead (all ranks), the folder kept as it is.
llmscale's own state is JSON + safetensors (no pickle).

    manager = CheckpointManager(cfg, world=world)
    manager.resume(engine, stateful)                 # newest complete checkpoint, or None for a fresh run
    for step ...:
        manager.poll()                               # finishes a background save (checkpoint.async)
        manager.maybe_save(step, engine, stateful)   # every N steps / T minutes (cfg.checkpoint)
    manager.wait()

``engine`` is an :class:`llmscale.engine.Engine` (its ``layout``, ``param_names``, ``save`` and
``load(universal=)``); ``stateful`` maps names to objects with ``state_dict()`` / ``load_state_dict()``.

``checkpoint.async``: the shards are snapshot to host memory and written in the background
(:mod:`llmscale.checkpoint.async_save`); :meth:`CheckpointManager.poll` at each step boundary finishes the save
(manifest, rename, ``latest``) once every rank's writer is done. Crash points for tests: store.crash_point.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from llmscale import dist as ldist
from llmscale.checkpoint import codec
from llmscale.checkpoint.loading import DamagedCheckpoint, LoadingMixin  # noqa: F401 - DamagedCheckpoint re-exported
from llmscale.checkpoint.store import (
    BEST,
    CHECKPOINTS,
    CONFIG_FILE,
    ENGINE_DIR,
    LATEST,
    MANIFEST,
    STATE_DIR,
    TMP_PREFIX,
    TRASH_PREFIX,
    build_manifest,
    crash_point,
    latest_complete,
    layout_dict,
    remove_folder,
    retention_victims,
    step_name,
)
from llmscale.errors import CheckpointError
from llmscale.files import atomic_write_text, fsync_dir, hash_files, relative_files
from llmscale.log import get_logger

log = get_logger(__name__)


class CheckpointManager(LoadingMixin):
    """Saves, finds and loads the checkpoints of one run directory. All ranks create one and call its
    methods together (they are collectives).

    ``cfg``: the RunConfig (run_dir, checkpoint section, the config recorded in each checkpoint); or give
    ``run_dir=`` and ``checkpoint=`` (a CheckpointConfig) directly. ``world``: this process's
    :class:`llmscale.dist.World` (rank and world size of the job). ``wait_timeout_s``: the bound on each wait for
    the other ranks (default: the config's train.wait_timeout_s, else :data:`llmscale.dist.DEFAULT_WAIT_S`).
    """

    def __init__(self, cfg: Any = None, *, world: Any, run_dir: str | Path | None = None,
                 checkpoint: Any = None, tokenizer_hash: Optional[str] = None,
                 wait_timeout_s: Optional[float] = None) -> None:
        from llmscale.config import CheckpointConfig

        self.cfg = cfg
        self.world = world
        self.rank, self.world_size = int(world.rank), int(world.world_size)
        self.run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
        self.ckpt_cfg = checkpoint if checkpoint is not None else (
            cfg.checkpoint if cfg is not None else CheckpointConfig())
        self.dir = self.run_dir / CHECKPOINTS
        self.tokenizer_hash = tokenizer_hash if tokenizer_hash is not None else self._run_tokenizer_hash()
        self._last_save_time = time.monotonic()
        self.last_saved_step: Optional[int] = None
        self.loaded: Optional[Path] = None
        self._pending: Optional[tuple[Any, dict]] = None  # (AsyncWriter, save info) of a save in flight
        self._fell_back = False  # a resume passed over a damaged newer checkpoint
        train = getattr(cfg, "train", None)
        self.wait_s = float(wait_timeout_s if wait_timeout_s is not None
                            else getattr(train, "wait_timeout_s", ldist.DEFAULT_WAIT_S))

    def _waiting(self, what: str):
        """A bounded, named wait for the other ranks (:func:`llmscale.dist.deadline`, train.wait_timeout_s)."""
        return ldist.deadline(what, self.wait_s)

    def _run_tokenizer_hash(self) -> Optional[str]:
        from llmscale.artifacts import RUN_TOKENIZER, TOKENIZER_META

        try:
            return json.loads((self.run_dir / RUN_TOKENIZER / TOKENIZER_META).read_text(encoding="utf-8")).get("hash")
        except (OSError, ValueError):
            return None

    def _crash_point(self, phase: str, step: int) -> None:
        crash_point(phase, step, self.rank)

    # ---------------------------------------------------------------- save
    def should_save(self, step: int, *, force: bool = False) -> bool:
        c = self.ckpt_cfg
        due = force or bool(c.every_steps and step % c.every_steps == 0)
        if c.every_minutes:
            # wall clocks differ between ranks: rank 0 decides for all
            late = (time.monotonic() - self._last_save_time) >= 60.0 * c.every_minutes
            due = ldist.any_rank(due or (late and self.rank == 0))
        return due

    def maybe_save(self, step: int, engine: Any, stateful: dict[str, Any], force: bool = False,
                   sync: bool = False) -> Optional[Path]:
        """Save if ``step`` is due (every_steps / every_minutes) or ``force``; returns the checkpoint or None.
        ``sync``: finish before returning even with checkpoint.async (preemption, the end of training)."""
        if not self.should_save(step, force=force):
            return None
        if self._pending is not None and self._pending[1]["step"] == step:  # this step's save is in flight
            if sync:
                self.wait()
            return self.dir / step_name(step)
        if self.last_saved_step == step and (self.dir / step_name(step)).is_dir():
            return self.dir / step_name(step)
        return self.save(step, engine, stateful, sync=sync)

    def save(self, step: int, engine: Any, stateful: dict[str, Any], *, sync: bool = False) -> Path:
        """Write checkpoint ``step`` atomically (collective). Returns RUN_DIR/checkpoints/step-NNNNNN. With
        ``checkpoint.async`` (and not ``sync``) the folder is complete only once :meth:`poll` / :meth:`wait`
        finish it; a save still in flight is finished first."""
        from llmscale.checkpoint.async_save import AsyncWriter
        from llmscale.rng import save_rng_state

        self.wait()
        t0 = time.perf_counter()
        rank = self.rank
        name = step_name(step)
        tmp, final = self.dir / (TMP_PREFIX + name), self.dir / name
        err: Optional[BaseException] = None
        if rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / STATE_DIR).mkdir(parents=True)
            except OSError as e:  # reported through the agreement below, so no rank waits forever
                err = e
        if ldist.any_rank(err is not None):
            err = err or CheckpointError(f"rank 0 could not create {tmp}")
        writer = (AsyncWriter(root=tmp, step=step, rank=rank, crash=lambda phase: self._crash_point(phase, step))
                  if self.ckpt_cfg.async_ and not sync else None)
        states: dict[str, Any] = {}
        try:
            if err is not None:
                raise err
            # 1. llmscale state of this rank: stateful objects + RNG (JSON + safetensors, fsynced)
            states = {k: v.state_dict() for k, v in stateful.items()}
            codec.save_state_files(tmp / STATE_DIR / f"rank-{rank:05d}", states)
            save_rng_state(tmp / STATE_DIR / f"rng-rank-{rank:05d}")
            self._crash_point("state", step)
        except BaseException as e:  # noqa: BLE001 - every rank must reach the agreement below
            err = e
        # no rank enters DeepSpeed's save (collectives inside) unless every rank got this far
        with self._waiting(f"checkpoint {name}: every rank's own state files, before DeepSpeed's save"):
            self._agree(name, tmp, None if err is None else f"rank {rank}: {type(err).__name__}: {err}", err)
        # 2. DeepSpeed's shards (every rank writes its own; async: snapshot to host memory, written later)
        try:
            with self._waiting(f"checkpoint {name}: DeepSpeed's save (each rank writes its shards, then waits at "
                               f"DeepSpeed's barriers)"):
                engine.save(tmp / ENGINE_DIR, {"llmscale_step": step},
                            write_file=writer.capture if writer else None,
                            before_file=lambda: self._crash_point("engine-file", step))
        except BaseException as e:  # noqa: BLE001
            if self.world_size > 1:
                self._abandon(name, tmp, e)
            err = e
        try:
            if err is not None:
                raise err
            if rank == 0 and self.cfg is not None and dataclasses.is_dataclass(self.cfg):
                from llmscale.config import save_resolved

                save_resolved(self.cfg, tmp / CONFIG_FILE)
            self._crash_point("engine", step)
        except BaseException as e:  # noqa: BLE001 - every rank must reach the agreement below
            err = e
        with self._waiting(f"checkpoint {name}: every rank's report that its shards are written"):
            self._agree(name, tmp, None if err is None else f"rank {rank}: {type(err).__name__}: {err}", err)
        info = {"step": step, "name": name, "tmp": tmp, "final": final, "t0": t0, "states": states,
                "stateful": sorted(stateful), "layout": layout_dict(engine.layout), "param_names": engine.param_names}
        if writer is not None:
            writer.start()
            self._pending = (writer, info)
            sizes = ldist.all_gather_object(writer.snapshot_bytes)
            log.info("checkpoint %s: training resumes after %.2fs; %.1f MB host-memory snapshot (largest rank %.1f MB) "
                     "written in the background", name, time.perf_counter() - t0, sum(sizes) / 1e6, max(sizes) / 1e6)
            return final
        with self._waiting(f"checkpoint {name}: every rank's files on disk"):
            ldist.barrier()
        # 3. hash + fsync, split over ranks; rank 0 writes the manifest last
        rels = relative_files(tmp)
        mine = hash_files(tmp, [r for i, r in enumerate(rels) if i % self.world_size == rank], fsync=True)
        self._crash_point("hashed", step)
        with self._waiting(f"checkpoint {name}: the other ranks' checksums"):
            parts = ldist.all_gather_object(mine)
        self._commit(info, parts)
        return final

    def _abandon(self, name: str, tmp: Path, err: BaseException) -> None:
        """A rank failed inside DeepSpeed's save while the others may be inside its collectives: telling them
        could hang, so this rank says what happened and exits 1 now. The others stop when they notice (at once
        on gloo, where the closed connection fails their collective; after train.wait_timeout_s otherwise)."""
        import logging
        import sys

        prev = latest_complete(self.dir)
        log.error("saving checkpoint %s failed on rank %d inside DeepSpeed's save (%s: %s). The other ranks wait in "
                  "DeepSpeed's collectives and cannot be told safely, so this rank exits now (code 1). The previous "
                  "checkpoint is untouched%s; %s is not a checkpoint and is removed on the next start. Fix the "
                  "error and re-run the same command to resume.", name, self.rank, type(err).__name__, err,
                  f" ({prev.path})" if prev else "", tmp.name)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)

    def _agree(self, name: str, tmp: Path, failure: Optional[str], err: Optional[BaseException]) -> None:
        """Every rank learns every rank's failure of this save; on any, the folder goes and all ranks raise."""
        bad = [f for f in ldist.all_gather_object(failure) if f]
        if bad:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = latest_complete(self.dir)
            raise CheckpointError(
                f"saving checkpoint {name} failed ({'; '.join(bad)}). The previous checkpoint is untouched"
                f"{' (' + str(prev.path) + ')' if prev else ''}. "
                f"Free disk space in {self.dir} (or fix the error above) and re-run the same command to resume."
            ) from err

    def poll(self) -> None:
        """At a step boundary (collective, cheap): finish a background save once every rank's writer is done; a
        failed write raises CheckpointError on every rank."""
        if self._pending is None:
            return
        with self._waiting(f"checkpoint {self._pending[1]['name']}: whether every rank's background write is done"):
            busy = ldist.any_rank(not self._pending[0].done())
        if not busy:
            self._finish()

    def wait(self) -> None:
        """Block until a background save (if any) is written, then finish it (collective)."""
        if self._pending is not None:
            self._pending[0].join()
            self._finish()

    def _finish(self) -> None:
        (writer, info), self._pending = self._pending, None
        e = writer.error
        with self._waiting(f"checkpoint {info['name']}: the other ranks' background writes and checksums"):
            self._agree(info["name"], info["tmp"], None if e is None else f"rank {self.rank}: background write: "
                        f"{type(e).__name__}: {e}", e)
            parts = ldist.all_gather_object(writer.hashes)
        if self.rank == 0:  # the small files written at the step boundary (state, RNG, config, DeepSpeed's scripts)
            done = {k for p in parts for k in p}
            parts.append(hash_files(info["tmp"], [r for r in relative_files(info["tmp"]) if r not in done], fsync=True))
        self._commit(info, parts)

    def _commit(self, info: dict, parts: list[dict]) -> None:
        """Rank 0: manifest (last), rename, ``latest``, retention; then every rank moves on (collective)."""
        step, name, tmp, final = info["step"], info["name"], info["tmp"], info["final"]
        files: dict[str, dict] = {}
        if self.rank == 0:
            for p in parts:
                files.update(p)
            manifest = build_manifest(
                name=name, step=step, layout=info["layout"], world_size=self.world_size,
                tokenizer_hash=self.tokenizer_hash, stateful=info["stateful"], param_names=info["param_names"],
                state_summary=codec.summary(info["states"]), files=files)
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            self._crash_point("manifest", step)
            if final.exists():  # e.g. a damaged folder of the same step left from earlier: drop it
                remove_folder(final, f"{TRASH_PREFIX}{name}-{os.getpid()}")
            os.replace(tmp, final)
            fsync_dir(self.dir)
            self._crash_point("rename", step)
            atomic_write_text(self.dir / LATEST, name + "\n")
            self._crash_point("latest", step)
            self._apply_retention(step)
        with self._waiting(f"checkpoint {name}: rank 0's manifest, rename and `latest`"):
            ldist.barrier()
        self._last_save_time = time.monotonic()
        self.last_saved_step = step
        total, dt = sum(v["size"] for v in files.values()), time.perf_counter() - info["t0"]
        log.info("checkpoint %s saved: %.1f MB in %.2fs (%.2f GB/s)", name, total / 1e6, dt, total / 1e9 / (dt or 1))

    def _apply_retention(self, step: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and every ``keep_every``-th; never the newest."""
        c = self.ckpt_cfg
        for info in retention_victims(self.dir, keep_last=c.keep_last, keep_every=c.keep_every):
            trash = self.dir / f"{TRASH_PREFIX}{info.name}"
            os.replace(info.path, trash)  # one atomic step: never a half-deleted folder with a step name
            self._crash_point("retention", step)
            shutil.rmtree(trash, ignore_errors=True)
            log.info("retention: removed %s", info.name)

    def mark_best(self, step: int, *, metric: str, value: float) -> None:
        """Record checkpoint ``step`` (already saved) as the best so far: RUN_DIR/checkpoints/best.json, written
        atomically by rank 0; retention never removes it. Collective."""
        self.wait()
        if self.rank == 0:
            name = step_name(step)
            atomic_write_text(self.dir / BEST, json.dumps({"step": step, "name": name, "metric": metric,
                                                           "value": value, "path": str(self.dir / name)}, indent=1))
        ldist.barrier()
