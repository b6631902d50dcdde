"""Run identity and run state: the config hash, the per-run state folder, epoch checkpoints and resume.

Config hash
    ``config_hash(resolved)`` = sha256 of the resolved config as canonical JSON (sorted keys) minus the keys
    that cannot change a result (``NON_RESULT_KEYS``: progress bars, logger, device, CPU threads, the results
    folder, the caches, ``resume``/``skip_done`` themselves, ``mode``, the process-group settings ``dist`` (a
    torchrun run trains on the same global batch) and the placement switches
    ``train.data_on_device``/``channels_last``/``compile``), first 16 hex digits. Paths inside
    the repository (e.g. the shipped ``vit_micro`` weights, resolved to an absolute path) are hashed relative
    to it, so clones in different folders agree. ``device`` is left out on purpose: a run interrupted on one
    machine may be continued on another, and a sweep re-launched elsewhere should still skip finished jobs;
    the record keeps the device it ran on.

State folder
    ``${results.dir}/state/<config-hash>/`` holds ``last.pt`` (written at the end of every epoch: temp file,
    fsync, rename; only the last one is kept) and ``lock``. A run holds an exclusive ``flock`` on ``lock`` for
    its life, so the kernel releases it when the process dies (even on ``kill -9``). A second identical
    command started while the first still runs does not share that state: it checkpoints into a private
    folder ``state/<config-hash>.<run_id>/`` that is removed when it finishes. The folder is deleted after the
    run's record is written (successful or failed records alike keep nothing behind, except a failed run's
    ``last.pt``, kept so that fixing code and re-running resumes from the last good epoch).

What a checkpoint holds: the trainable tensors and every buffer (never the frozen weights), the method's own
state (``Method.state_dict()``), the optimiser, the scheduler, Python/NumPy/torch (and CUDA) RNG states, the
training loader's generator state, and the engine's counters (epoch, step, images seen, train time, history,
best-so-far for the selection protocols). Data-dependent methods (SPT, GPS, SCT) re-run ``prepare``
deterministically on resume (SPT loads its cached sensitivity); a fingerprint of the structure it produced
(trainable tensor names and shapes, and every buffer's bytes right after ``prepare``) is stored in the
checkpoint and must match, else the run stops instead of mixing two selections.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from bench.checks import ResumeError  # noqa: F401  (re-exported for the engine)

log = logging.getLogger("bench")

# dotted keys of the resolved config that never change a result (see the module docstring)
NON_RESULT_KEYS = ("progress", "logger", "device", "threads", "results.dir", "cache_dir", "resume", "skip_done",
                   "mode", "dataset.cache_dir", "dataset.decode_workers", "dist",
                   # where the data and model live (bench/placement.py): speed switches, like ``device``
                   "train.data_on_device", "train.channels_last", "train.compile")
CHECKPOINT = "last.pt"


def _drop(d: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p) if isinstance(d, dict) else None
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def _relativise(obj: Any, root: str) -> Any:
    if isinstance(obj, dict):
        return {k: _relativise(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relativise(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith(root + os.sep):
        return "<suite>/" + obj[len(root) + 1:]
    return obj


def hash_material(resolved: dict) -> dict:
    from bench import ROOT

    d = json.loads(json.dumps(resolved, default=str))
    for k in NON_RESULT_KEYS:
        _drop(d, k)
    return _relativise(d, str(ROOT))


def config_hash(resolved: dict) -> str:
    text = json.dumps(hash_material(resolved), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# fingerprint of what ``prepare`` built
# ----------------------------------------------------------------------------------------------
def structure_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if p.requires_grad:
            h.update(f"P {n} {tuple(p.shape)} {p.dtype}\n".encode())
    for n, b in model.named_buffers():
        h.update(f"B {n} {tuple(b.shape)} {b.dtype}\n".encode())
        if b.device.type != "meta":
            h.update(b.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if b.numel() else b"")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (e.g. a pre-flight meta build) without moving any global RNG."""
    st = rng_state()
    try:
        yield
    finally:
        set_rng_state(st)


# ----------------------------------------------------------------------------------------------
# the state folder
# ----------------------------------------------------------------------------------------------
class StateBusy(RuntimeError):
    pass


class RunState:
    """``${results.dir}/state/<hash>[.<run_id>]/``: the lock, ``last.pt`` and its atomic writes."""

    def __init__(self, results_dir: str | Path, chash: str, run_id: str, resume: bool = True):
        self.base = Path(results_dir) / "state"
        self.hash = chash
        self.resume_enabled = resume
        self.shared = True
        self._lock_fd: Optional[int] = None
        self.dir = self.base / chash
        if not self._try_lock(self.dir):
            log.warning("another run with config hash %s is running (it holds %s): this run neither resumes "
                        "from nor writes that state; it checkpoints into %s.%s", chash, self.dir / "lock",
                        self.dir, run_id)
            self.shared = False
            self.resume_enabled = False
            self.dir = self.base / f"{chash}.{run_id}"
            self._try_lock(self.dir)
        elif not resume and (self.dir / CHECKPOINT).exists():
            log.info("resume=never: ignoring %s", self.dir / CHECKPOINT)

    def _try_lock(self, folder: Path) -> bool:
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    @property
    def path(self) -> Path:
        return self.dir / CHECKPOINT

    def load(self) -> Optional[dict]:
        if not self.resume_enabled or not self.path.is_file():
            return None
        try:
            ck = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001  (a torn file cannot exist: writes are renames; still be safe)
            log.warning("cannot read %s (%s): starting from scratch", self.path, e)
            return None
        if not isinstance(ck, dict) or ck.get("config_hash") != self.hash:
            log.warning("%s belongs to another configuration: starting from scratch", self.path)
            return None
        return ck

    def save(self, ck: dict) -> Path:
        ck = {**ck, "config_hash": self.hash}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{CHECKPOINT}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(ck, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return self.path

    def release(self, remove: bool) -> None:
        """Drop the lock; ``remove`` deletes the folder (after the record is written)."""
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.base.rmdir()  # only when empty
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
