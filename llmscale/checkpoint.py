"""Sharded, atomic, verifiable checkpoints: save, retention, auto-resume, resharding, rollback.

A run directory holds::

    RUN_DIR/checkpoints/latest                   "step-000200" (switched with write-temp + os.replace)
    RUN_DIR/checkpoints/step-000200/manifest.json written LAST: every file's size and sha256, layout, step
    RUN_DIR/checkpoints/step-000200/model/...     DeepSpeed's per-rank model + optimizer shards (tag dir)
    RUN_DIR/checkpoints/step-000200/state/rank-00000.json|.safetensors   stateful objects of each rank
    RUN_DIR/checkpoints/step-000200/state/rng-rank-00000.json|.safetensors RNG of each rank (llmscale.rng)
    RUN_DIR/checkpoints/step-000200/config.yaml   the resolved run config
    RUN_DIR/checkpoints/step-000200/universal/... (only after a layout change or `llmscale ckpt convert`)

Saving writes everything under ``.tmp-step-000200``; after every rank is done (barrier) the ranks hash
the files (split between them), rank 0 gathers the lists, writes the manifest, renames the folder to
``step-000200`` and switches ``latest``. A folder without a manifest, or whose files do not match it,
is never loaded. DeepSpeed's own ``latest`` file is never used (explicit tags, ``save_latest=False``).

Storage: the checkpoint folder must be one that every rank sees (a shared filesystem, as DeepSpeed's own
resharding needs too): ranks split the hashing of all files and rank 0 renames the folder.

Safety: DeepSpeed loads its files with ``torch.load(weights_only=False)`` (deepspeed 0.19.8), i.e. pickle.
So nothing is handed to DeepSpeed before every file of the checkpoint matched the manifest's checksums
and no unlisted file sits beside them. llmscale's own state is JSON + safetensors (no pickle). (This stops
damaged and planted files; someone able to rewrite the manifest too is not stopped: protect the run
directory's permissions.)

    manager = CheckpointManager(cfg, world=world)
    manager.resume(engine, stateful)                 # newest complete checkpoint, or None for a fresh run
    for step ...:
        manager.maybe_save(step, engine, stateful)   # every N steps / T minutes (cfg.checkpoint)

Test hook: ``LLMSCALE_TEST_CRASH_AT=PHASE:STEP[:RANK]`` makes the process ``os._exit(137)`` inside the
save of STEP at PHASE (state, engine, hashed, manifest, rename, latest, retention), to test that a
crash at any point leaves a resumable run directory.
"""
from __future__ import annotations

from llmscale.errors import CheckpointError

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from llmscale.data.shards import atomic_write_text, fsync_dir, sha256_file
from llmscale.log import get_logger

log = get_logger(__name__)

FORMAT_NAME = "llmscale-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LATEST = "latest"
ENGINE_DIR = "model"
UNIVERSAL_DIR = "universal"
STATE_DIR = "state"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
CORRUPT_SUFFIX = ".corrupt"
_STEP_RE = re.compile(r"^step-(\d{6,})$")
_CRASH_ENV = "LLMSCALE_TEST_CRASH_AT"




def step_name(step: int) -> str:
    return f"step-{step:06d}"


def parse_step(name: str) -> Optional[int]:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- collectives (no-ops alone)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def _broadcast(obj: Any) -> Any:
    d = _dist()
    if not d:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list:
    d = _dist()
    if not d:
        return [obj]
    out: list = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def _any(flag: bool) -> bool:
    d = _dist()
    if not d:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if d.get_backend() == "nccl":
        t = t.cuda()
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return bool(t.item())


def _crash_point(phase: str, step: int) -> None:
    """Test hook: die like a SIGKILL at a named point of a save (see module doc)."""
    spec = os.environ.get(_CRASH_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != phase or int(parts[1]) != step:
        return
    if len(parts) > 2 and int(parts[2]) != _rank():
        return
    log.error("%s=%s: crashing now (test hook)", _CRASH_ENV, spec)
    os._exit(137)


# --------------------------------------------------------------------------- state <-> JSON + tensors


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """Plain JSON for the structure, tensors/arrays replaced by references into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise CheckpointError(
        f"state_dict entry {where} is a {type(obj).__name__}, which llmscale does not save (checkpoints hold no "
        f"pickles): return plain numbers, strings, lists, dicts, tensors or numpy arrays from state_dict()."
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def save_state_files(prefix: Path, state: dict[str, Any]) -> list[Path]:
    """``state`` (name -> state_dict) as PREFIX.json + PREFIX.safetensors (tensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT_NAME + "-state", "state": _encode(state, tensors, "state")}
    js, st = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".safetensors")
    save_file(tensors, str(st))
    _write_json(js, doc)
    return [js, st]


def load_state_files(prefix: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    js, st = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".safetensors")
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(st))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read llmscale state {js} / {st}: {e}") from e
    return _decode(doc["state"], tensors)


# --------------------------------------------------------------------------- engine adapter


def engine_layout(engine: Any) -> dict[str, int]:
    """dp/tp/pp/zero_stage of an llmscale Engine (``engine.layout``) or a bare DeepSpeedEngine."""
    lay = getattr(engine, "layout", None)
    if lay is not None:
        return {"dp": int(lay.dp), "tp": int(lay.tp), "pp": int(lay.pp), "zero_stage": int(lay.zero_stage),
                "world_size": int(lay.dp * lay.tp * lay.pp)}
    ds = engine
    pp = int(getattr(ds, "num_stages", 1) or 1)
    dp = int(getattr(ds, "dp_world_size", 1))
    tp = int(getattr(ds, "mp_world_size", 1))
    return {"dp": dp, "tp": tp, "pp": pp, "zero_stage": int(ds.zero_optimization_stage()), "world_size": dp * tp * pp}


def _ds_engine(engine: Any) -> Any:
    return getattr(engine, "ds", engine)


def _engine_save(engine: Any, tag_dir: Path, client_state: dict) -> None:
    if hasattr(engine, "save") and hasattr(engine, "ds"):
        engine.save(tag_dir, client_state)
        return
    # a bare DeepSpeedEngine (benchmarks, tests): the minimal universal-checkpoint info of a DP-only model
    state = dict(client_state)
    state.setdefault("universal_checkpoint_info", {"universal_checkpoint_version": 0.2})
    engine.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, client_state=state, save_latest=False)


def _engine_load(engine: Any, tag_dir: Path, *, universal: bool) -> dict:
    ds = _ds_engine(engine)
    before = ds._config.load_universal_checkpoint
    ds._config.load_universal_checkpoint = universal
    try:
        if hasattr(engine, "load") and hasattr(engine, "ds"):
            return engine.load(tag_dir)
        path, client_state = ds.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {tag_dir}.")
        return dict(client_state or {})
    finally:
        ds._config.load_universal_checkpoint = before


def needs_universal(saved: dict, current: dict) -> bool:
    """Whether a checkpoint saved with layout ``saved`` must go through the universal format to load on
    ``current``: a different tensor/pipeline degree, or a different data-parallel size / ZeRO stage
    while the optimizer state is partitioned."""
    if saved["tp"] != current["tp"] or saved["pp"] != current["pp"]:
        return True
    zero = max(saved["zero_stage"], current["zero_stage"])
    return zero > 0 and (saved["dp"] != current["dp"] or saved["zero_stage"] != current["zero_stage"])


# --------------------------------------------------------------------------- inspection / verification


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    complete: bool  # has a readable manifest
    manifest: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def checkpoints_dir(run_or_ckpt_dir: str | Path) -> Path:
    """RUN_DIR -> RUN_DIR/checkpoints; a checkpoints folder is returned as is."""
    p = Path(run_or_ckpt_dir)
    if p.name == CHECKPOINTS or (p / LATEST).is_file() or any(parse_step(c.name) is not None for c in _children(p)):
        return p
    return p / CHECKPOINTS


def _children(p: Path) -> list[Path]:
    try:
        return list(p.iterdir())
    except OSError:
        return []


def read_manifest(ckpt: str | Path) -> dict:
    p = Path(ckpt) / MANIFEST
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no {MANIFEST}: it is not a complete checkpoint (a save was interrupted "
                              f"or the file was removed).") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} is unreadable ({e}): the checkpoint is damaged.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{p} is not an llmscale checkpoint manifest (format {data.get('format') if isinstance(data, dict) else None!r}).")
    return data


def list_checkpoints(run_or_ckpt_dir: str | Path) -> list[CheckpointInfo]:
    """Step folders, oldest first; ``complete`` = a manifest that parses (contents not hashed: see verify)."""
    d = checkpoints_dir(run_or_ckpt_dir)
    out = []
    for c in _children(d):
        step = parse_step(c.name)
        if step is None or not c.is_dir():
            continue
        try:
            m = read_manifest(c)
            out.append(CheckpointInfo(c, step, True, m))
        except CheckpointError:
            out.append(CheckpointInfo(c, step, False, {}))
    return sorted(out, key=lambda i: i.step)


def read_latest(run_or_ckpt_dir: str | Path) -> Optional[str]:
    """The name in ``latest`` if it is a well-formed step name, else None (garbage is reported, not used)."""
    p = checkpoints_dir(run_or_ckpt_dir) / LATEST
    try:
        text = p.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if parse_step(text) is None:
        log.warning("%s holds %r, not a checkpoint name: ignored (the newest complete checkpoint is found by scanning).",
                    p, text[:80])
        return None
    return text


def _relative_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return out


def _hash_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _hash_files(root: Path, rels: Iterable[str], *, fsync: bool = False) -> dict[str, dict]:
    """size + sha256 (+ fsync) of each file; threads overlap the files (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(rel: str) -> tuple[str, dict]:
        p = root / rel
        if fsync:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return rel, {"size": p.stat().st_size, "sha256": sha256_file(p)}

    with ThreadPoolExecutor(_hash_threads()) as pool:
        return dict(pool.map(one, list(rels)))


def verify_checkpoint(ckpt: str | Path, *, checksums: bool = True, shard: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems found in a checkpoint folder (empty list = good). Checks the manifest, that every listed
    file exists with its size (and sha256 when ``checksums``), and that no unlisted file could be loaded.
    ``shard=(i, n)`` checks only every n-th file starting at i (ranks split the hashing)."""
    ckpt = Path(ckpt)
    try:
        m = read_manifest(ckpt)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    files: dict[str, dict] = m["files"]
    if shard[0] == 0:
        present = set(_relative_files(ckpt)) - {MANIFEST}
        extra = sorted(f for f in present - set(files) if not f.startswith(TMP_PREFIX)
                       and not (f.startswith(UNIVERSAL_DIR + "/") and not m.get("universal")))
        for f in extra:
            problems.append(f"{ckpt / f}: file not listed in the manifest (planted or left by another tool); "
                            f"remove it or restore the checkpoint from a copy")
    names = [rel for i, rel in enumerate(sorted(files)) if i % shard[1] == shard[0]]
    to_hash = []
    for rel in names:
        if rel.startswith("/") or ".." in Path(rel).parts:
            problems.append(f"{MANIFEST} lists a path outside the checkpoint: {rel!r}")
            continue
        p = ckpt / rel
        want = files[rel]
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{p}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{p}: size {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
            continue
        to_hash.append(rel)
    if checksums and to_hash:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(_hash_threads()) as pool:
            digests = dict(zip(to_hash, pool.map(lambda r: sha256_file(ckpt / r), to_hash)))
        for rel in to_hash:
            if digests[rel] != files[rel]["sha256"]:
                problems.append(f"{ckpt / rel}: sha256 differs from the manifest (the file is corrupted or was replaced)")
    return problems


def _verify_collective(ckpt: Path) -> list[str]:
    """verify_checkpoint with the hashing split over all ranks; every rank gets the full list."""
    mine = verify_checkpoint(ckpt, shard=(_rank(), _world_size()))
    out: list[str] = []
    for part in _all_gather(mine):
        out.extend(part)
    # a missing/unreadable manifest is reported by every rank: keep one copy
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- universal conversion


def convert_to_universal(ckpt: str | Path, *, workers: int = 1) -> Path:
    """Run DeepSpeed's ds_to_universal on CKPT/model into CKPT/universal, then add the new files to the
    manifest (atomically). One process only (rank 0, or the `llmscale ckpt convert` command)."""
    ckpt = Path(ckpt)
    problems = verify_checkpoint(ckpt)
    if problems:
        raise CheckpointError(f"refusing to convert {ckpt}: " + "; ".join(problems[:5]))
    m = read_manifest(ckpt)
    final = ckpt / UNIVERSAL_DIR
    if m.get("universal") and final.is_dir():
        return final
    tmp = ckpt / (TMP_PREFIX + UNIVERSAL_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / ENGINE_DIR),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"DeepSpeed's universal conversion of {ckpt} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n"
            f"Re-run it by hand: {' '.join(cmd)}")
    (ckpt / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer; llmscale uses explicit folders
    os.replace(tmp, final)
    fsync_dir(ckpt)
    m["files"].update({f"{UNIVERSAL_DIR}/{k}": v for k, v in _hash_files(final, _relative_files(final), fsync=True).items()})
    m["universal"] = UNIVERSAL_DIR
    atomic_write_text(ckpt / MANIFEST, json.dumps(m, indent=1, sort_keys=True))
    log.info("converted %s to the universal format in %.1fs", ckpt.name, time.perf_counter() - t0)
    return final


# --------------------------------------------------------------------------- the manager


class BadStepGuard:
    """Counts non-finite (skipped) steps in a row; ``update(skipped)`` is True when a rollback is due.
    ``max_bad_steps=0`` turns rollback off."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.in_a_row = 0

    def update(self, skipped: bool) -> bool:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.max_bad_steps and self.in_a_row >= self.max_bad_steps:
            self.in_a_row = 0
            return True
        return False


class CheckpointManager:
    """Saves, finds and loads the checkpoints of one run directory. All ranks create one and call its
    methods together (they are collectives).

    ``cfg``: the RunConfig (run_dir, checkpoint section, the config recorded in each checkpoint); or give
    ``run_dir=`` and ``checkpoint=`` (a CheckpointConfig) directly.
    """

    def __init__(self, cfg: Any = None, *, world: Any = None, run_dir: str | Path | None = None,
                 checkpoint: Any = None, tokenizer_hash: Optional[str] = None) -> None:
        from llmscale.config import CheckpointConfig

        self.cfg = cfg
        self.world = world
        self.run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
        self.ckpt_cfg = checkpoint if checkpoint is not None else (cfg.checkpoint if cfg is not None else CheckpointConfig())
        self.dir = self.run_dir / CHECKPOINTS
        self.tokenizer_hash = tokenizer_hash if tokenizer_hash is not None else self._run_tokenizer_hash()
        self._last_save_time = time.monotonic()
        self.last_saved_step: Optional[int] = None
        self.loaded: Optional[Path] = None

    def _run_tokenizer_hash(self) -> Optional[str]:
        meta = self.run_dir / "tokenizer" / "tokenizer_meta.json"
        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("hash")
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------- save
    def should_save(self, step: int, *, force: bool = False) -> bool:
        c = self.ckpt_cfg
        due = force or bool(c.every_steps and step % c.every_steps == 0)
        if c.every_minutes:
            # wall clocks differ between ranks: rank 0 decides for all
            late = (time.monotonic() - self._last_save_time) >= 60.0 * c.every_minutes
            due = _any(due or (late and _rank() == 0))
        return due

    def maybe_save(self, step: int, engine: Any, stateful: dict[str, Any], force: bool = False) -> Optional[Path]:
        """Save if ``step`` is due (every_steps / every_minutes) or ``force``; returns the checkpoint or None."""
        if not self.should_save(step, force=force):
            return None
        if self.last_saved_step == step and (self.dir / step_name(step)).is_dir():
            return self.dir / step_name(step)
        return self.save(step, engine, stateful)

    def save(self, step: int, engine: Any, stateful: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically (collective). Returns RUN_DIR/checkpoints/step-NNNNNN."""
        t0 = time.perf_counter()
        rank, world = _rank(), _world_size()
        name = step_name(step)
        tmp = self.dir / (TMP_PREFIX + name)
        final = self.dir / name
        err: Optional[BaseException] = None
        if rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / STATE_DIR).mkdir(parents=True)
            except OSError as e:  # reported through the agreement below, so no rank waits forever
                err = e
        if _any(err is not None):
            err = err or CheckpointError(f"rank 0 could not create {tmp}")
        try:
            if err is not None:
                raise err
            # 1. llmscale state of this rank: stateful objects + RNG (JSON + safetensors, fsynced)
            from llmscale.rng import save_rng_state

            states = {k: v.state_dict() for k, v in stateful.items()}
            save_state_files(tmp / STATE_DIR / f"rank-{rank:05d}", states)
            save_rng_state(tmp / STATE_DIR / f"rng-rank-{rank:05d}")
            _crash_point("state", step)
            # 2. DeepSpeed's shards (every rank writes its own)
            _engine_save(engine, tmp / ENGINE_DIR, {"llmscale_step": step})
            if rank == 0 and self.cfg is not None and dataclasses.is_dataclass(self.cfg):
                from llmscale.config import save_resolved

                save_resolved(self.cfg, tmp / "config.yaml")
            _crash_point("engine", step)
        except BaseException as e:  # noqa: BLE001 - every rank must reach the agreement below
            err = e
        failed = _all_gather(None if err is None else f"rank {rank}: {type(err).__name__}: {err}")
        bad = [f for f in failed if f]
        if bad:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"saving checkpoint {name} failed ({'; '.join(bad)}). The previous checkpoint is untouched"
                f"{' (' + str(self.latest_complete().path) + ')' if self.latest_complete() else ''}. "
                f"Free disk space in {self.dir} (or fix the error above) and re-run the same command to resume."
            ) from err
        _barrier()  # every rank's files are on disk
        # 3. hash + fsync, split over ranks; rank 0 writes the manifest last
        rels = _relative_files(tmp)
        mine = _hash_files(tmp, [r for i, r in enumerate(rels) if i % world == rank], fsync=True)
        _crash_point("hashed", step)
        parts = _all_gather(mine)
        if rank == 0:
            files: dict[str, dict] = {}
            for p in parts:
                files.update(p)
            refs: dict[str, torch.Tensor] = {}
            enc = _encode(states, refs, "state")
            summary = enc if not refs and len(json.dumps(enc)) < 4096 else {}  # for `ckpt list`; tensors stay in state/
            manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "name": name,
                "step": step,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "layout": engine_layout(engine),
                "world_size": world,
                "engine_dir": ENGINE_DIR,
                "universal": None,
                "tokenizer_hash": self.tokenizer_hash,
                "stateful": sorted(stateful),
                # DeepSpeed parameter name -> single-device name (pipeline stages rename parameters)
                "param_names": dict(getattr(engine, "_name_map", None) or {}),
                "state_summary": summary,
                "versions": {"torch": torch.__version__, "deepspeed": _ds_version()},
                "total_bytes": sum(v["size"] for v in files.values()),
                "files": files,
            }
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            _crash_point("manifest", step)
            if final.exists():  # e.g. a damaged folder of the same step left from earlier: keep it aside, then drop it
                trash = self.dir / f"{TRASH_PREFIX}{name}-{os.getpid()}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            _crash_point("rename", step)
            atomic_write_text(self.dir / LATEST, name + "\n")
            _crash_point("latest", step)
            self._apply_retention(step)
        _barrier()
        self._last_save_time = time.monotonic()
        self.last_saved_step = step
        if rank == 0:
            total = sum(v["size"] for v in files.values())
            dt = time.perf_counter() - t0
            log.info("checkpoint %s saved: %.1f MB in %.2fs (%.2f GB/s)", name, total / 1e6, dt, total / 1e9 / max(dt, 1e-9))
        return final

    def _apply_retention(self, step: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and every ``keep_every``-th; never the newest."""
        c = self.ckpt_cfg
        complete = [i for i in list_checkpoints(self.dir) if i.complete]
        if not complete:
            return
        keep = {i.step for i in complete[-max(c.keep_last, 1):]}
        keep.add(complete[-1].step)
        if c.keep_every:
            keep |= {i.step for i in complete if i.step % c.keep_every == 0}
        for info in complete:
            if info.step in keep:
                continue
            trash = self.dir / f"{TRASH_PREFIX}{info.name}"
            os.replace(info.path, trash)  # one atomic step: never a half-deleted folder with a step name
            _crash_point("retention", step)
            shutil.rmtree(trash, ignore_errors=True)
            log.info("retention: removed %s", info.name)

    # ---------------------------------------------------------------- find
    def latest_complete(self) -> Optional[CheckpointInfo]:
        done = [i for i in list_checkpoints(self.dir) if i.complete]
        return done[-1] if done else None

    def _clean_stale(self) -> None:
        """Rank 0: remove folders of saves that never completed (.tmp-*) and unfinished deletions (.trash-*)."""
        for c in _children(self.dir):
            if c.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and c.is_dir():
                log.info("removing %s (left by an interrupted save or clean-up)", c)
                shutil.rmtree(c, ignore_errors=True)

    def find_resumable(self) -> Optional[Path]:
        """Newest checkpoint that verifies (collective). Damaged ones are reported loudly and set aside."""
        if _rank() == 0:
            self._clean_stale()
            infos = list_checkpoints(self.dir)
            latest = read_latest(self.dir)
            if latest and latest not in {i.name for i in infos}:
                log.warning("%s names %s, which does not exist: scanning for the newest complete checkpoint.",
                            self.dir / LATEST, latest)
        else:
            infos = None
        infos = _broadcast(infos)
        if not infos:
            return None
        failures = []
        for info in reversed(infos):
            problems = _verify_collective(info.path)
            if not problems:
                if failures:
                    log.warning("resuming from %s, an OLDER checkpoint, because newer ones are damaged (see above)", info.name)
                return info.path
            failures.append((info, problems))
            log.error("CHECKPOINT %s IS DAMAGED and will not be loaded:\n  %s", info.path, "\n  ".join(problems[:10]))
            if _rank() == 0:
                aside = info.path.with_name(info.name + CORRUPT_SUFFIX + f"-{int(time.time())}")
                try:
                    os.replace(info.path, aside)
                    log.error("moved it to %s (inspect or delete it)", aside)
                except OSError as e:
                    log.error("could not move it aside: %s", e)
            _barrier()
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
            if _rank() == 0 and any(parse_step(c.name) is not None for c in _children(self.dir)):
                aside = self.run_dir / f"{CHECKPOINTS}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(self.dir, aside)
                log.warning("--no-resume: starting from scratch; the existing checkpoints were moved to %s", aside)
            _barrier()
            return None
        if resume_from is not None:
            path = self._explicit(Path(resume_from))
            problems = _verify_collective(path)
            if problems:
                raise CheckpointError(f"--resume-from {path}: the checkpoint is damaged: " + "; ".join(problems[:5]))
        else:
            path = self.find_resumable()
            if path is None:
                log.info("no checkpoint in %s: starting from scratch", self.dir)
                return None
        return self.load(path, engine, stateful, verified=True)

    def _explicit(self, p: Path) -> Path:
        if (p / MANIFEST).is_file():
            return p
        infos = [i for i in list_checkpoints(p) if i.complete]
        if not infos:
            raise CheckpointError(f"--resume-from {p}: neither a checkpoint (no {MANIFEST}) nor a run/checkpoints folder "
                                  f"holding one. `llmscale ckpt list {p}` shows what is there.")
        return infos[-1].path

    def load(self, ckpt: str | Path, engine: Any, stateful: dict[str, Any], *, verified: bool = False,
             keep: Iterable[str] = ()) -> int:
        """Load checkpoint ``ckpt`` into ``engine`` and ``stateful`` (except the names in ``keep``); reshards
        through the universal format when the layout differs. Returns its step. Collective."""
        ckpt = Path(ckpt)
        if not verified:
            problems = _verify_collective(ckpt)
            if problems:
                raise CheckpointError(f"{ckpt} is damaged: " + "; ".join(problems[:5]))
        m = read_manifest(ckpt)
        saved, current = m["layout"], engine_layout(engine)
        t0 = time.perf_counter()
        if needs_universal(saved, current):
            log.warning("layout changed (saved dp=%d tp=%d pp=%d zero=%d, now dp=%d tp=%d pp=%d zero=%d): loading %s "
                        "through DeepSpeed's universal checkpoint", saved["dp"], saved["tp"], saved["pp"],
                        saved["zero_stage"], current["dp"], current["tp"], current["pp"], current["zero_stage"], ckpt.name)
            err = None
            if _rank() == 0:
                try:
                    convert_to_universal(ckpt)
                except CheckpointError as e:
                    err = str(e)
            err = _broadcast(err)
            if err:
                raise CheckpointError(err)
            view = self._universal_view(ckpt, m, engine)
            try:
                client = _engine_load(engine, view, universal=True)
            finally:
                _barrier()
                if _rank() == 0 and view.name != UNIVERSAL_DIR:
                    shutil.rmtree(view, ignore_errors=True)
        else:
            client = _engine_load(engine, ckpt / ENGINE_DIR, universal=False)
        step = int(m["step"])
        if client.get("llmscale_step", step) != step:
            raise CheckpointError(f"{ckpt}: DeepSpeed's state is from step {client.get('llmscale_step')}, the manifest "
                                  f"says {step}: the folder mixes two checkpoints.")
        # llmscale state: the same rank's files on the same layout; rank 0's otherwise (rank-independent state)
        rank = _rank()
        same = saved == current and m.get("world_size") == _world_size()
        src = rank if same else 0
        states = load_state_files(ckpt / STATE_DIR / f"rank-{src:05d}")
        keep = set(keep)
        for k, obj in stateful.items():
            if k in keep:
                continue
            if k not in states:
                raise CheckpointError(f"{ckpt} holds no state for {k!r} (it has {sorted(states)}): written by a "
                                      f"different trainer version? Resume with --no-resume to start afresh.")
            obj.load_state_dict(states[k])
        from llmscale.rng import load_rng_state, restore_rng_state

        rng_src = rank if (ckpt / STATE_DIR / f"rng-rank-{rank:05d}.json").is_file() else 0
        restore_rng_state(*load_rng_state(ckpt / STATE_DIR / f"rng-rank-{rng_src:05d}"))
        _barrier()
        self.loaded = ckpt
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        log.info("loaded checkpoint %s (step %d) in %.2fs", ckpt, step, time.perf_counter() - t0)
        return step

    def _universal_view(self, ckpt: Path, m: dict, engine: Any) -> Path:
        """The universal folder as the loading engine names its parameters. Pipeline stages name parameters
        by layer index ("3.attn.q_proj.weight"), a plain model by module path: both map to single-device
        names (recorded in the manifest at save, and known by the loading engine), so a folder of symlinks
        renames them without copying. Collective; returns CKPT/universal itself when the names agree."""
        src = ckpt / UNIVERSAL_DIR
        saved: dict[str, str] = m.get("param_names") or {}
        target: dict[str, str] = dict(getattr(engine, "_name_map", None) or {})
        if not target or all((src / "zero" / k).is_dir() for k in target):
            return src
        view = ckpt / (TMP_PREFIX + "universal-view")
        if _rank() == 0:
            shutil.rmtree(view, ignore_errors=True)
            (view / "zero").mkdir(parents=True)
            for f in src.iterdir():
                if f.is_file():
                    os.symlink(f.resolve(), view / f.name)
            by_full: dict[str, Path] = {}
            for d in sorted((src / "zero").iterdir()):
                if d.is_dir():
                    by_full.setdefault(saved.get(d.name, d.name), d)
                else:
                    os.symlink(d.resolve(), view / "zero" / d.name)
            for ds_name, full in target.items():
                if full in by_full and not (view / "zero" / ds_name).exists():
                    os.symlink(by_full[full].resolve(), view / "zero" / ds_name)
        _barrier()
        return view

    def rollback(self, engine: Any, stateful: dict[str, Any], *, keep: Iterable[str] = ("loader",)) -> int:
        """After repeated non-finite steps: reload the newest complete checkpoint into ``engine`` and
        ``stateful`` except ``keep`` (default the loader, which has already moved past the offending batches,
        so they are skipped). Returns the step rolled back to. Collective."""
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


def _ds_version() -> Optional[str]:
    try:
        import deepspeed

        return deepspeed.__version__
    except Exception:  # noqa: BLE001 - informational only
        return None
