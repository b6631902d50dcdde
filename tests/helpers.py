"""Shared test helpers: tiny backbones, composed configs, parameter counting."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import backbones
import methods
from bench import CONF_DIR
from bench.metrics import count_params

TINY_VIT = {
    "name": "vit_micro", "family": "vit", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
    "num_heads": 2, "mlp_ratio": 2.0, "qkv_bias": True, "class_token": True, "global_pool": "token",
    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "checkpoint": None,
}


def compose_cfg(overrides: list[str] | None = None):
    """The runner's config, composed exactly as ``python -m bench <overrides>`` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def method_cfg(name: str, **overrides):
    cfg = OmegaConf.load(Path(CONF_DIR) / "method" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def build(method: str, backbone: dict | None = None, num_classes: int = 10, seed: int = 0, device="cpu", **method_over):
    """A tiny backbone with ``method`` applied: (model, method_object)."""
    torch.manual_seed(seed)
    model = backbones.build(OmegaConf.create(backbone or TINY_VIT), num_classes=num_classes, device=device)
    m = methods.build(method_cfg(method, **method_over))
    m.apply(model)
    return model, m


def trainable(model) -> int:
    return count_params(model, backbones.head_of(model))["trainable_params"]


def vit_b16_params(method: str, *extra: str) -> dict:
    """``mode=params`` report of ``method`` on vit_b16 with 100 classes (meta device, no data)."""
    from bench.run import params_report

    cfg = compose_cfg(["mode=params", "backbone=vit_b16", f"method={method}", "dataset.num_classes=100", *extra])
    return params_report(cfg)


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# Tiny video backbones: VideoMAE-shaped (tubelet 2x8x8 on 4 frames at 16², 2x2x2 = 8 tokens) and Video-Swin-shaped
TINY_VIDEO_VIT = {
    "name": "video_micro", "family": "video_vit", "img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2,
    "num_heads": 2, "mlp_ratio": 2.0, "num_frames": 4, "tubelet_size": 2, "frame_stride": 2, "head_bn": False,
    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "checkpoint": None,
}
TINY_VIDEO_SWIN = {
    "name": "video_swin_micro", "family": "video_swin", "img_size": 16, "patch_size": [2, 4, 4], "embed_dim": 16,
    "depths": [2, 2], "num_heads": [1, 2], "window_size": [2, 2, 2], "mlp_ratio": 2.0, "num_frames": 4,
    "frame_stride": 2, "head_pool": "vpetl", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "checkpoint": None,
}


def clips(n: int = 4, frames: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, frames, size, size, generator=g)
