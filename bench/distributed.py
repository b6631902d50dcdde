"""Multi-process single runs: ``torchrun --nproc_per_node=N -m bench ...`` (``torch.distributed``).

Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) every helper here is a no-op and a run is the
plain single-process run. Under torchrun:

* ``setup(device, backend)`` joins the process group: ``nccl`` on CUDA (one GPU per local rank),
  ``gloo`` on CPU (``dist.backend: auto``, or name one);
* ``train.batch_size`` is the *global* batch: ``ShardedBatchSampler`` draws the single-process batch
  (same shuffled order from the same generator) and gives rank r its contiguous slice, so the union of
  the ranks' micro-batches of a step is exactly the single-process batch of that step;
* the engine all-reduces the sample-weighted loss and the gradients of the trainable tensors, so the
  step is the single-process step on the global batch (``reduce_gradients``);
* rank 0 alone writes records, checkpoints and logs; every rank ends at a barrier (``shutdown``).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger("bench")

_STATE: dict[str, Any] = {"backend": None}


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def requested() -> bool:
    """Started by torchrun (or any launcher setting WORLD_SIZE) with more than one process."""
    return env_world_size() > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def backend() -> Optional[str]:
    return _STATE["backend"] if active() else None


def info() -> Optional[dict]:
    """What the record says about the process group (None for a single-process run)."""
    return {"world_size": world_size(), "backend": backend()} if active() else None


def local_device(device: torch.device) -> torch.device:
    """Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    if requested() and device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise ValueError(f"torchrun started local rank {local_rank()} but torch sees {n} GPU(s): use "
                             f"--nproc_per_node={n} or fewer")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def setup(device: torch.device, backend_name: str = "auto", timeout_min: float = 60.0) -> Optional[dict]:
    """Join the process group when started by torchrun; returns ``info()`` (None: single process)."""
    if not requested() or active():
        return info()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    name = str(backend_name or "auto")
    if name == "auto":
        name = "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ValueError("dist.backend=nccl needs CUDA devices: use device=cuda (or dist.backend=gloo on CPU)")
    kwargs = {"device_id": device} if name == "nccl" else {}
    try:
        dist.init_process_group(name, timeout=datetime.timedelta(minutes=float(timeout_min)), **kwargs)
    except TypeError:  # older torch without device_id
        dist.init_process_group(name, timeout=datetime.timedelta(minutes=float(timeout_min)))
    _STATE["backend"] = name
    if not is_main():  # one process talks: the others only warn
        logging.getLogger("bench").setLevel(logging.WARNING)
    return info()


def shutdown(wait: bool = True) -> None:
    """Barrier (``wait``: everyone finished, e.g. rank 0 wrote the record) and leave the group."""
    if not active():
        return
    try:
        if wait:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        _STATE["backend"] = None


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. generates and caches a data set), the others after it."""
    if active() and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if active() and is_main():
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dev = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else None
    dist.broadcast_object_list(box, src=src, device=dev)
    return box[0]


def all_gather_object(obj: Any) -> list:
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few Python numbers (float64)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s values (bool tensors travel as uint8)."""
    if not active():
        return
    with torch.no_grad():
        for t in tensors:
            if t.numel() == 0:
                continue
            buf = t.data
            if buf.dtype == torch.bool:
                tmp = buf.to(torch.uint8)
                dist.broadcast(tmp, src=src)
                buf.copy_(tmp.bool())
            elif buf.is_contiguous():
                dist.broadcast(buf, src=src)
            else:
                tmp = buf.contiguous()
                dist.broadcast(tmp, src=src)
                buf.copy_(tmp)


def broadcast_model_state(model: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s trainable tensors and buffers on every rank (frozen weights come from the same seed
    and checkpoint on every rank and are not sent)."""
    broadcast_tensors([p for p in model.parameters() if p.requires_grad], src)
    broadcast_tensors(list(model.buffers()), src)


def broadcast_rng(src: int = 0) -> None:
    """Every rank continues from rank ``src``'s Python/NumPy/torch RNG states."""
    if not active():
        return
    from bench import state as run_state

    run_state.set_rng_state(broadcast_object(run_state.rng_state(), src))


def reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks in one flat buffer. A parameter keeps ``grad=None`` only
    when no rank produced a gradient for it (as the single-process optimiser would skip it); the caller
    scales each rank's loss by its share of the global batch, so the sum is the global-batch gradient."""
    if not active() or not params:
        return
    dev = params[0].device
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    flat = torch.zeros(total + len(params), dtype=torch.float32, device=dev)
    off = 0
    for i, p in enumerate(params):
        if p.grad is not None:
            flat[off: off + sizes[i]].copy_(p.grad.detach().reshape(-1))
            flat[total + i] = 1.0
        off += sizes[i]
    dist.all_reduce(flat)
    has_grad = flat[total:].tolist()  # one device sync, not one per tensor
    off = 0
    for i, p in enumerate(params):
        if has_grad[i] > 0:
            g = flat[off: off + sizes[i]].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        off += sizes[i]


# ----------------------------------------------------------------------------------------------
# data sharding
# ----------------------------------------------------------------------------------------------
def shard_range(n: int, world: int, r: int) -> tuple[int, int]:
    """[start, stop) of rank ``r``'s contiguous share of ``n`` items (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def global_batch_size(n: int, batch_size: int, i: int) -> int:
    """Size of global batch ``i`` of an epoch over ``n`` examples (drop_last=False)."""
    return max(0, min(batch_size, n - i * batch_size))


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``r``'s slice of every batch of ``batch_sampler`` (the single-process batches). A rank whose
    slice of a short last batch is empty gets the batch's first index as a placeholder (the engine skips
    it: its share of the batch, ``shard_range``, is 0 and it contributes no loss or gradient)."""

    def __init__(self, batch_sampler: Iterable[list[int]], world: int, r: int):
        self.batch_sampler, self.world, self.rank = batch_sampler, int(world), int(r)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            a, b = shard_range(len(batch), self.world, self.rank)
            yield list(batch[a:b]) if b > a else list(batch[:1])

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]
