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
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from llmscale import dist as ldist
from llmscale.checkpoint import codec
from llmscale.checkpoint.safe_load import REFUSED
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
    CheckpointInfo,
    VerifiedReader,
    build_manifest,
    children,
    clean_stale,
    crash_point,
    latest_complete,
    layout_dict,
    list_checkpoints,
    parse_step,
    read_latest,
    read_manifest,
    remove_folder,
    retention_victims,
    set_aside_corrupt,
    step_name,
    verify_checkpoint,
)
from llmscale.checkpoint.universal import load_through_universal, needs_universal
from llmscale.errors import CheckpointError
from llmscale.files import atomic_write_text, fsync_dir, hash_files, relative_files
from llmscale.log import get_logger

log = get_logger(__name__)


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest, found while loading it (``problems``: one line each)."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems



class CheckpointManager:
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

