"""What every dataset builder returns: a ``Task`` with named splits of in-memory image tensors.

Images are decoded/generated and resized once, kept as uint8 [N, 3, H, W]; normalisation (and
optional batch augmentation) happens per batch, so later epochs cost no decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class DataError(ValueError):
    pass


def resize_uint8(images: torch.Tensor, size, chunk: int = 256) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to size×size (or ``size`` = (h, w)) (bilinear, antialiased), keeping uint8."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if images.shape[-2] == h and images.shape[-1] == w:
        return images.contiguous()
    out = []
    for i in range(0, images.shape[0], chunk):
        x = images[i: i + chunk].float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


class ImageTensorDataset(Dataset):
    """uint8 images [N, 3, H, W] + int64 labels; yields normalised float tensors.

    Supports batched fetching (``__getitems__``): the DataLoader gets whole batches at once.
    ``augment`` (optional) maps a float batch in [0, 1] to an augmented batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x)
        return (x - self.mean) / self.std, self.labels[idx]

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]

    def __getitems__(self, indices: list[int]):
        return self.batch(torch.as_tensor(indices))


def _identity(batch):
    return batch


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                shard: Optional[tuple[int, int]] = None, indices: Optional[Sequence[int]] = None) -> DataLoader:
    """A single-process loader; a dataset's own ``collate(samples)`` (dense tasks: lists of images/targets,
    padded batches) is its collate_fn, else batched datasets (``__getitems__``) pass their batch through.

    ``shard=(world, rank)`` (multi-process runs, ``bench.distributed``): the same batches in the same order
    (same generator draws), each cut to this rank's contiguous slice; ``len`` is unchanged. ``indices``: only
    these examples, in this order (an evaluation shard)."""
    g = torch.Generator()
    g.manual_seed(seed)
    collate = getattr(ds, "collate", None)
    if collate is None and hasattr(ds, "__getitems__"):
        collate = _identity
    if indices is not None:
        from torch.utils.data import BatchSampler

        return DataLoader(ds, batch_sampler=BatchSampler(list(indices), batch_size, False), num_workers=0,
                          collate_fn=collate)
    if shard is None or int(shard[0]) <= 1:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last,
                          num_workers=0, collate_fn=collate)
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    from bench.distributed import ShardedBatchSampler

    # the DataLoader draws its base seed from ``g`` and then RandomSampler its permutation, as above
    base = RandomSampler(ds, generator=g) if shuffle else SequentialSampler(ds)
    sampler = ShardedBatchSampler(BatchSampler(base, batch_size, drop_last), int(shard[0]), int(shard[1]))
    return DataLoader(ds, batch_sampler=sampler, generator=g, num_workers=0, collate_fn=collate)


@dataclass
class Task:
    """A task with named splits and the protocol's split roles; ``kind`` selects its loss, metric and
    evaluation loop (``bench.kinds``: image_cls, video_cls; dense tasks: detection, segmentation)."""

    name: str
    benchmark: str
    num_classes: int
    splits: dict[str, Dataset]
    roles: dict[str, str]  # train / val / trainval / test -> split name
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    info: dict = field(default_factory=dict)
    kind: str = "image_cls"

    def split(self, role: str) -> Dataset:
        name = self.roles.get(role)
        if name is None or name not in self.splits:
            raise DataError(f"task '{self.name}' has no '{role}' split (roles: {self.roles})")
        return self.splits[name]
