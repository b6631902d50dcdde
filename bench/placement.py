"""Where a run's training data and model live: the device data path, channels_last and torch.compile.

Device data path (``train.data_on_device: auto | true | false``). The image datasets keep their
training split as a uint8 tensor cache (``datasets/base.py``: VTAB-1k is 1,000 images, 150 MB at
224²). With the device path that cache is moved to the run's device once, and every batch is gathered,
augmented and normalised there, so the CPU does no per-batch work but drawing indices. ``auto`` turns
it on for CUDA when the split is such a cache and fits in half the free device memory; ``true`` also
on CPU (the same code, useful for tests); ``false`` keeps the DataLoader path.

What runs on the device is the CPU path's own arithmetic, so batches are identical, not merely equal
in distribution:

* batch order: the indices come from a ``DataLoader`` over the split's length with the same batch
  size, ``shuffle=True`` and a generator seeded like ``datasets.base.make_loader`` (so it consumes the
  generator exactly as the DataLoader path does, and its ``generator`` state resumes the same way);
* ``ImageTensorDataset``: ``x.float() / 255`` -> the dataset's ``augment`` callable (tensor ops, if
  any) -> ``(x - mean) / std``, the same expression as ``ImageTensorDataset.batch``;
* ``PILAugmentDataset`` without a PIL transform (VTAB-1k without ``train_aug``, FGVC eval): the same;
* ``RaggedCropDataset`` (FGVC training: shorter side = R, random crop + flip): the crop offsets and
  flips are drawn from torch's global RNG in the same calls and order as ``RaggedCropDataset.batch``
  and the pixels are gathered on the device with one indexing op.

Anything else (per-sample PIL RandAugment of V-PETL's ``train_aug``, video clips, dense tasks, or a
subclass that overrides ``batch``) keeps the DataLoader path, and the record says why.

``train.channels_last``: model and 4-D inputs in channels_last memory format (a forward pre-hook
converts the input, so the DataLoader and device paths and evaluation all get it).
``train.compile``: ``torch.compile`` of the model's forward (true = inductor, or a backend name such
as ``aot_eager``); when compiling fails (at setup or on the first forward) the run logs a warning and
continues eagerly, and the record says so.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

AUTO_FREE_FRACTION = 0.5  # auto: the cache may take at most this share of the free device memory


class _Indices(Dataset):
    """A dataset of its own indices: batched fetching returns the index tensor of the batch."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.as_tensor(indices, dtype=torch.long)


class DeviceBatches:
    """Iterates like the training DataLoader (same length, order, ``generator``) but yields device batches."""

    def __init__(self, index_loader, fetch: Callable[[torch.Tensor], Any], dataset):
        self._loader, self._fetch, self.dataset = index_loader, fetch, dataset
        self.generator = index_loader.generator
        self.batch_size = index_loader.batch_size

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for idx in self._loader:
            yield self._fetch(idx)


def _setting(value, name: str, choices=("auto", "true", "false")) -> str:
    v = str(value).lower() if value is not None else "false"
    if v not in choices:
        from bench.checks import ConfigError

        raise ConfigError(f"{name}={value}: choose {' | '.join(choices)}")
    return v


def _tensor_fetch(ds, device: torch.device):
    """Fetch for ``ImageTensorDataset`` (and ``PILAugmentDataset`` without a PIL transform)."""
    images = ds.images.to(device)
    labels = ds.labels.to(device)
    mean, std = ds.mean.to(device), ds.std.to(device)
    augment = ds.augment

    def fetch(idx: torch.Tensor):
        idx = idx.to(device, non_blocking=True)
        x = images[idx].float().div_(255.0)
        if augment is not None:
            x = augment(x)
        return (x - mean) / std, labels[idx]
    return fetch, images.numel()


def _ragged_fetch(ds, device: torch.device):
    """Fetch for ``RaggedCropDataset``: random crop + flip, drawn as its ``batch`` draws them."""
    data = ds.data.to(device)
    index = ds.index.long()
    index_dev = index.to(device)
    labels = ds.labels.to(device)
    mean, std = ds.mean.to(device), ds.std.to(device)
    c, flip = int(ds.crop), bool(ds.flip)
    ar = torch.arange(c, device=device)
    ch = torch.arange(3, device=device)

    def fetch(idx: torch.Tensor):
        idx = torch.as_tensor(idx).view(-1)
        rows = index[idx]
        tops, lefts, flips = [], [], []
        for _, h, w in rows.tolist():  # the same RNG calls, in the same order, as RaggedCropDataset.batch
            tops.append(int(torch.randint(0, h - c + 1, (1,))))
            lefts.append(int(torch.randint(0, w - c + 1, (1,))))
            flips.append(bool(flip and torch.rand(1).item() < 0.5))
        idx_d = idx.to(device, non_blocking=True)
        off, h, w = index_dev[idx_d].unbind(1)
        top = torch.tensor(tops, device=device)
        left = torch.tensor(lefts, device=device)
        fl = torch.tensor(flips, device=device)
        cols = torch.where(fl[:, None], left[:, None] + (c - 1 - ar), left[:, None] + ar)  # [B, c]
        rws = top[:, None] + ar  # [B, c]
        gather = (off[:, None, None, None] + ch[None, :, None, None] * (h * w)[:, None, None, None]
                  + rws[:, None, :, None] * w[:, None, None, None] + cols[:, None, None, :])
        x = data[gather].float().div_(255.0)
        return (x - mean) / std, labels[idx_d]
    return fetch, data.numel()


def device_fetch(ds) -> tuple[Optional[Callable], str]:
    """(builder, reason): ``builder(ds, device) -> (fetch, numel)`` for the device path, or None and why not."""
    from datasets.base import ImageTensorDataset
    from datasets.images import PILAugmentDataset, RaggedCropDataset

    batch = getattr(type(ds), "batch", None)
    if batch is ImageTensorDataset.batch:
        fn = _tensor_fetch
    elif batch is PILAugmentDataset.batch:
        if ds.pil_transform is not None:
            return None, "per-sample PIL augmentation (train_aug: flip + RandAugment) runs on the CPU"
        fn = _tensor_fetch
    elif batch is RaggedCropDataset.batch:
        fn = _ragged_fetch
    else:
        return None, f"{type(ds).__name__} has no device path"
    return fn, "tensor cache"


def _cache_bytes(ds) -> int:
    t = getattr(ds, "images", None)
    if t is None:
        t = getattr(ds, "data", None)
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def train_loader(ds, batch_size: int, seed: int, device: torch.device, train_cfg, kind: str = "image_cls",
                 shard: tuple[int, int] | None = None):
    """The training loader: ``DeviceBatches`` (device data path) or ``datasets.base.make_loader``'s DataLoader.
    ``shard`` = (world, rank) under torchrun: the sharded DataLoader (each rank's slice of every global batch).

    Returns (loader, info); ``info`` goes into the record's ``perf.placement``."""
    from datasets.base import make_loader

    mode = _setting(train_cfg.get("data_on_device", "auto"), "train.data_on_device")
    info: dict = {"data_on_device": False, "data_on_device_setting": mode}
    reason = None
    fn = None
    if shard is not None:
        info["reason"] = f"torchrun ({shard[0]} processes): the sharded DataLoader"
        return make_loader(ds, batch_size, shuffle=True, seed=seed, drop_last=False, shard=shard), info
    if mode == "false":
        reason = "train.data_on_device=false"
    elif kind != "image_cls":
        reason = f"{kind} task: batches come from the DataLoader"
    elif mode == "auto" and device.type != "cuda":
        reason = f"auto: off on {device.type}"
    else:
        fn, why = device_fetch(ds)
        if fn is None:
            reason = why
        elif mode == "auto":
            need = _cache_bytes(ds)
            free = torch.cuda.mem_get_info(device)[0]
            if need > AUTO_FREE_FRACTION * free:
                fn, reason = None, (f"auto: the cache ({need / 2**20:.0f} MiB) exceeds {AUTO_FREE_FRACTION:.0%} of "
                                    f"the free device memory ({free / 2**20:.0f} MiB)")
    if fn is None:
        if mode == "true":
            log.warning("train.data_on_device=true but %s: using the DataLoader path", reason)
        info["reason"] = reason
        return make_loader(ds, batch_size, shuffle=True, seed=seed, drop_last=False), info
    fetch, _ = fn(ds, device)
    info.update(data_on_device=True, cache_mb=round(_cache_bytes(ds) / 2**20, 1), dataset=type(ds).__name__)
    log.info("training split (%s, %.0f MiB) moved to %s once; batches are gathered and normalised there",
             type(ds).__name__, info["cache_mb"], device)
    index_loader = make_loader(_Indices(len(ds)), batch_size, shuffle=True, seed=seed, drop_last=False)
    return DeviceBatches(index_loader, fetch, ds), info


def _channels_last_input(module, args):
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def prepare_model(model: nn.Module, device: torch.device, train_cfg) -> dict:
    """Apply ``train.channels_last`` and ``train.compile`` to the (prepared, placed) model; returns record info."""
    info: dict = {"channels_last": bool(train_cfg.get("channels_last", False)),
                  "amp": (str(train_cfg.get("amp")) if device.type == "cuda" and train_cfg.get("amp") else None)}
    if info["channels_last"]:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_channels_last_input)
        log.info("channels_last: model and 4-D inputs in channels_last memory format")
    setting = train_cfg.get("compile", False)
    if setting in (None, False) or str(setting).lower() in ("false", "none", "off"):
        info["compile"] = None
        return info
    backend = "inductor" if setting is True or str(setting).lower() == "true" else str(setting)
    info["compile"] = backend
    compile_forward(model, backend, info)
    return info


def compile_forward(model: nn.Module, backend: str, info: dict) -> None:
    """Replace ``model.forward`` by its ``torch.compile``d version; fall back to eager (with a warning,
    noted in ``info['compile_fallback']``) when compiling fails at setup or on the first forward."""
    eager = model.forward

    def fail(e: BaseException, when: str) -> None:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        info["compile_fallback"] = f"{when}: {msg}"
        log.warning("train.compile=%s failed %s (%s); training continues without torch.compile", backend, when, msg)

    try:
        compiled = torch.compile(eager, backend=backend)
    except Exception as e:  # noqa: BLE001  (an unknown backend, a missing compiler...)
        fail(e, "at setup")
        return
    state = {"ok": None}

    def forward(*args, **kwargs):
        if state["ok"] is False:
            return eager(*args, **kwargs)
        if state["ok"]:
            return compiled(*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (first call: a compile error; a real error recurs eagerly)
            state["ok"] = False
            fail(e, "on the first forward")
            return eager(*args, **kwargs)
        state["ok"] = True
        return out

    model.forward = forward
    log.info("train.compile: model forward compiled with torch.compile(backend=%s)", backend)
