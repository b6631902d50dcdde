"""VideoMAE's ViT (family ``video_vit``) on timm's VisionTransformer: tubelet embedding, fixed sinusoidal
positions, q/v biases, mean pooling.

Architecture (VideoMAE ``modeling_finetune.py``, as AdaptFormer's video code builds it):

* ``TubeletEmbed``: Conv3d(3→d, kernel = stride = (tubelet, p, p)); a clip [B, 3, T, H, W] becomes
  (T/tubelet)·(H/p)·(W/p) tokens (784 for 8 frames at 224² with 2×16×16), t-major then h, w. No class token.
* positions: VideoMAE's fixed 1-D sinusoid table over the flattened token index (not a parameter, not in
  the checkpoint; the table for N tokens is the first N rows of any longer one), added after the embedding.
* attention: the fused ``qkv`` weight without bias plus learnable ``q_bias`` and ``v_bias``; the key
  bias is a constant zero (``QVBiasLinear``). A key bias cannot change attention (it adds the same q·b to
  every logit of a query), so a ViT checkpoint with a full qkv bias loads exactly by dropping its k part.
* head: mean over all tokens → ``fc_norm`` (LayerNorm) → ``head``. With ``head_bn: true`` (AdaptFormer's
  video fine-tuning, after MAE's linear probe) the head is BatchNorm1d(affine=False, eps 1e-6) + Linear
  with the Linear trunc-normal(0.01), bias 0.

``fc_norm`` is new at fine-tuning (the pre-training file has the encoder's final ``norm``, which VideoMAE
drops) and counts as backbone: ``full`` trains 86,227,200 parameters on ViT-B (issue/spec count), PETL
methods keep it frozen at its LayerNorm init (1, 0). AdaptFormer's code trains it too, but behind the
BatchNorm(affine=False) head its affine is cancelled by the standardisation, so freezing it changes
nothing the head can express; the anchors' counts (AdaptFormer 1,189,632) do not include it either.

Checkpoints: VideoMAE pre-training ``.pth`` (key ``model``; encoder under ``encoder.``, decoder and
``encoder_to_decoder``/``mask_token`` dropped, ``encoder.norm`` dropped), VideoMAE fine-tuned files (no
prefix, ``fc_norm``/``head``; head dropped), or a 2-D timm ViT state dict of the same width (e.g.
``vit_micro``'s shipped weights), which is inflated: the patch kernel is repeated over the tubelet and
divided by its length (I3D inflation), class token / learned positions / k bias dropped, its final
``norm`` becomes ``fc_norm``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from backbones.blocks import AdaptableBlock
from backbones.checkpoint import load_checkpoint
from bench.registry import BACKBONES

VIDEO_VIT_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """VideoMAE's position table: row p, column j = sin (j even) / cos (j odd) of p / 10000^(2⌊j/2⌋/dim)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class TubeletEmbed(nn.Module):
    """Clip [B, C, T, H, W] → tokens [B, N, d] plus the fixed sinusoidal positions."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, num_frames=16, tubelet_size=2,
                 bias=True, device=None, dtype=None, **_):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.tubelet_size, self.num_frames = int(tubelet_size), int(num_frames)
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"backbone.num_frames={num_frames} must be a multiple of backbone.tubelet_size={tubelet_size}")
        self.grid_size = (self.num_frames // self.tubelet_size, self.img_size[0] // self.patch_size[0],
                          self.img_size[1] // self.patch_size[1])
        self.num_patches = math.prod(self.grid_size)
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(self.tubelet_size, *self.patch_size),
                              stride=(self.tubelet_size, *self.patch_size), bias=bias, device=device, dtype=dtype)
        self.register_buffer("pos_table", sinusoid_table(self.num_patches, embed_dim).to(device=device),
                             persistent=False)

    def feat_ratio(self, as_scalar=True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def positions(self, n: int, like: torch.Tensor) -> torch.Tensor:
        table = self.pos_table if n <= self.pos_table.shape[1] or self.pos_table.is_meta else \
            sinusoid_table(n, self.embed_dim).to(self.pos_table.device)
        return table[:, :n].to(like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"a video backbone takes clips [B, 3, T, H, W], got a tensor of shape {tuple(x.shape)}")
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x + self.positions(x.shape[1], x)


class QVBiasLinear(nn.Module):
    """A fused qkv projection with learnable q and v biases and a constant zero k bias (VideoMAE, BEiT).
    ``bias`` is the concatenated (3d) vector, so code that reads ``linear.bias`` works unchanged."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = dim, 3 * dim
        self.weight = nn.Parameter(torch.empty(3 * dim, dim, device=device, dtype=dtype))
        self.q_bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        self.v_bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.trunc_normal_(self.weight, std=0.02)

    @property
    def bias(self) -> torch.Tensor:
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias, requires_grad=False), self.v_bias])

    @torch.no_grad()
    def set_bias(self, value: torch.Tensor) -> None:
        """Take a full (3d) qkv bias (a merge): its q and v parts; the k part is dropped, which leaves the
        attention unchanged (a key bias adds the same q·b to every logit of a query)."""
        d = self.q_bias.shape[0]
        self.q_bias.copy_(value[:d])
        self.v_bias.copy_(value[2 * d:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, q_bias, v_bias"


class BatchNormHead(nn.BatchNorm1d):
    """BatchNorm1d that uses its running statistics for a training batch of one example (a last batch of
    an epoch can be that small), where batch statistics are undefined."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def build_video_vit(cfg: Mapping[str, Any], num_classes: int, drop_path: float = 0.0, device: str | torch.device = "cpu"):
    kwargs = {k: cfg[k] for k in VIDEO_VIT_ARGS if k in cfg and cfg[k] is not None}
    embed = functools.partial(TubeletEmbed, num_frames=int(cfg.get("num_frames", 16)),
                              tubelet_size=int(cfg.get("tubelet_size", 2)))
    model = VisionTransformer(num_classes=num_classes, drop_path_rate=drop_path, block_fn=AdaptableBlock,
                              embed_layer=embed, class_token=False, pos_embed="none", global_pool="avg",
                              fc_norm=True, qkv_bias=False, device=device, **kwargs)
    for blk in model.blocks:
        blk.attn.qkv = QVBiasLinear(model.embed_dim, device=device)
    if cfg.get("head_bn", False) and num_classes > 0:
        linear = nn.Linear(model.embed_dim, num_classes, device=device)
        if linear.weight.device.type != "meta":
            nn.init.trunc_normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)
        model.head = nn.Sequential(BatchNormHead(model.embed_dim, affine=False, eps=1e-6, device=device), linear)
    model.petl_family = "video_vit"
    model.petl_name = cfg.get("name", "video_vit")
    ckpt = cfg.get("checkpoint")
    if ckpt and torch.device(device).type != "meta":
        load_checkpoint(model, ckpt, model.petl_name, prepare=functools.partial(prepare_videomae, model=model))
    return model


def prepare_videomae(sd: dict, model: nn.Module) -> dict:
    """Map a VideoMAE pre-training / fine-tuned file, or a 2-D ViT file (inflated), to this model's keys."""
    if any(k.startswith("encoder.") for k in sd):  # pre-training: encoder + decoder
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    out = {}
    proj = model.patch_embed.proj.weight
    for k, v in sd.items():
        if k in ("cls_token", "pos_embed", "mask_token") or k.startswith("decoder") or k == "encoder_to_decoder.weight":
            continue
        if k == "patch_embed.proj.weight" and v.dim() == 4 and proj.dim() == 5:  # 2-D ViT: inflate over time
            t = proj.shape[2]
            v = v[:, :, None].repeat(1, 1, t, 1, 1) / t
        if k.endswith("attn.qkv.bias"):  # a full qkv bias: keep q and v (a key bias cannot change attention)
            d = v.shape[0] // 3
            out[k[: -len("qkv.bias")] + "qkv.q_bias"] = v[:d]
            out[k[: -len("qkv.bias")] + "qkv.v_bias"] = v[2 * d:]
            continue
        if k.endswith("attn.q_bias") or k.endswith("attn.v_bias"):
            k = k.replace("attn.q_bias", "attn.qkv.q_bias").replace("attn.v_bias", "attn.qkv.v_bias")
        if k.startswith("norm.") and "fc_norm.weight" not in sd:  # a 2-D ViT's final norm → fc_norm
            k = "fc_norm." + k[len("norm."):]
        out[k] = v
    if "fc_norm.weight" not in out:  # VideoMAE creates fc_norm at fine-tuning: it starts at its init
        out.update({k: v for k, v in model.state_dict().items() if k.startswith("fc_norm.")})
    return out


for _name in ("videomae_b", "video_micro"):
    BACKBONES.add(_name, build_video_vit)
