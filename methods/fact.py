"""FacT (Jie & Deng, AAAI 2023): factor-tuning, ΔW of every linear factorised with shared factors.

Official code (JieShibo/PETL-ViT ``FacT/fact_tt.py``, ``FacT/fact_tk.py``): one U (dim→r, no bias,
PyTorch's default Linear init) and one V (r→dim, no bias, **zero**) shared by the whole model; for each
of q, k, v, proj, fc1 and fc2 of every block the update is ``ΔW·x = s · V(Dropout₀.₁(core(U x)))``.

* ``fact_tt`` (tensor-train): per-matrix cores, r×r for q/k/v/proj, r×4r for fc1 (its r·4 outputs are
  reshaped to 4 chunks of r, each sent through V: the 4 row blocks of the 3072-row fc1) and 4r×r for
  fc2 (its 3072 inputs are reshaped to 4 chunks of dim, each sent through U, concatenated). Cores use
  PyTorch's default Linear init. Params: 1536r + 144r² on ViT-B/16 (r = 8: 21,504).
* ``fact_tk`` (Tucker): cores built from a shared C (r×r×r) and P (r × 12 per block): the block's
  cores are ``C @ P[:, idx:idx+12]`` (4 for q/k/v/proj, 8 for fc1/fc2, the fc ones reshaped to r×4r
  exactly as the official code does). C and P xavier-uniform. Params: 1536r + r³ + 144r (r = 32:
  86,528; r = 16: 30,976).

V = 0 makes ΔW = 0 at init (logits equal the frozen model's); U and the cores are non-zero, so
everything learns after the first step. ``merge`` adds the (eval-mode) ΔW to each weight.

Deviations: the shared factors live in ``model.petl_fact`` (deleted by ``merge``); the per-linear
deltas reference them. ViT-B/16's MLP ratio 4 is generalised to ``m = hidden / dim`` chunks (the tiny
test ViT has m = 2), so P has (4 + 2m) columns per block. Official per-dataset rank/scale ship in
``methods/data/per_dataset_vtab.yaml`` (``per_dataset=true``). Also defined on Swin: there each stage
(block width) gets its own pair of shared factors (``model.petl_fact[<width>]``), since U and V are sized
by the width; ViT has one pair.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.blocks.dataset_params import resolved_cfg
from methods.blocks.lora import DeltaLinear


class FacTShared(nn.Module):
    """The model-wide factors: U (r×dim), V (dim×r, zero) and, for TK, C (r×r×r) and P (r×cols)."""

    def __init__(self, dim: int, rank: int, kind: str, p_cols: int = 0, device=None):
        super().__init__()
        self.kind, self.rank = kind, rank
        self.U = nn.Parameter(torch.empty(rank, dim, device=device))
        self.V = nn.Parameter(torch.zeros(dim, rank, device=device))
        if kind == "tk":
            self.C = nn.Parameter(torch.empty(rank, rank, rank, device=device))
            self.P = nn.Parameter(torch.empty(rank, p_cols, device=device))
        if self.U.device.type != "meta":
            nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))  # nn.Linear's default weight init
            if kind == "tk":
                nn.init.xavier_uniform_(self.C)
                nn.init.xavier_uniform_(self.P)

    def tk_cores(self, idx: int, n: int) -> torch.Tensor:
        """(r, r, n): C @ P[:, idx:idx+n] (batched over C's first index, as the official code)."""
        return self.C @ self.P[:, idx:idx + n]


class FacTDelta(nn.Module):
    """ΔW·x for one linear site ('qkv', 'proj', 'fc1' or 'fc2') of one block.

    Cores are kept in the official row-vector convention: the core output is ``u @ M``.
    """

    def __init__(self, shared: FacTShared, site: str, dim: int, chunks: int, scale: float, dropout: float,
                 tk_index: int = 0, device=None):
        super().__init__()
        self._shared = [shared]  # not registered: the factors belong to model.petl_fact
        self.site, self.dim, self.m, self.scale, self.tk_index = site, dim, chunks, float(scale), tk_index
        self.dp = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        r = shared.rank
        if shared.kind == "tt":
            shapes = {"qkv": [(r, r)] * 3, "proj": [(r, r)], "fc1": [(r, chunks * r)], "fc2": [(chunks * r, r)]}[site]
            # nn.Linear(in, out) cores: weight (out, in); M = weight.T
            self.cores = nn.ParameterList([nn.Parameter(torch.empty(o, i, device=device)) for i, o in shapes])
            if device is None or torch.device(device).type != "meta":
                for c in self.cores:
                    nn.init.kaiming_uniform_(c, a=math.sqrt(5))

    @property
    def shared(self) -> FacTShared:
        return self._shared[0]

    def core_mats(self) -> list[torch.Tensor]:
        sh, r, m = self.shared, self.shared.rank, self.m
        if sh.kind == "tt":
            return [c.t() for c in self.cores]
        if self.site in ("qkv", "proj"):
            c = sh.tk_cores(self.tk_index, 4)
            return [c[:, :, 0], c[:, :, 1], c[:, :, 2]] if self.site == "qkv" else [c[:, :, 3]]
        c = sh.tk_cores(self.tk_index, 2 * m)
        if self.site == "fc1":
            return [c[:, :, :m].reshape(r, m * r)]
        return [c[:, :, m:].reshape(r, m * r).t()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V = self.shared.U, self.shared.V
        mats = self.core_mats()
        if self.site in ("qkv", "proj"):
            u = F.linear(x, U)
            out = torch.cat([F.linear(self.dp(u @ M), V) for M in mats], dim=-1)
        elif self.site == "fc1":
            t = self.dp(F.linear(x, U) @ mats[0])
            out = F.linear(t.reshape(*t.shape[:-1], self.m, -1), V).flatten(-2)
        else:  # fc2: the hidden is m chunks of dim
            u = F.linear(x.reshape(*x.shape[:-1], self.m, self.dim), U).flatten(-2)
            out = F.linear(self.dp(u @ mats[0]), V)
        return out * self.scale

    def delta_weight(self) -> torch.Tensor:
        U, V, r, s = self.shared.U, self.shared.V, self.shared.rank, self.scale
        mats = self.core_mats()
        if self.site in ("qkv", "proj"):
            return torch.cat([V @ M.t() @ U for M in mats], dim=0) * s
        M = mats[0]
        if self.site == "fc1":  # rows of chunk j: V · M[:, j r:(j+1) r]ᵀ · U
            return torch.cat([V @ M[:, j * r:(j + 1) * r].t() @ U for j in range(self.m)], dim=0) * s
        return torch.cat([V @ M[j * r:(j + 1) * r].t() @ U for j in range(self.m)], dim=1) * s


class _FacT(Method):
    families = ("vit", "swin", "video_vit", "video_swin")
    mergeable = True
    identity_at_init = True
    kind = "?"
    default_rank = 8

    def inject(self, model, sites):
        cfg = resolved_cfg(self)
        rank = int(cfg.get("rank") or self.default_rank)
        scale, dropout = float(cfg.get("scale", 1.0)), float(cfg.get("dropout", 0.1))
        if rank < 1:
            raise ValueError(f"method.rank must be >= 1 for {self.name} (got {rank})")
        # one pair of shared factors per block width: a single pair on ViT, one per stage on Swin
        groups: dict[int, list] = {}
        for b in sites:
            groups.setdefault(b.dim, []).append(b)
        model.petl_fact = nn.ModuleDict()
        for dim, blocks in groups.items():
            dev = blocks[0].linear("qkv").weight.device
            hidden = blocks[0].linear("fc1").out_features
            if hidden % dim:
                raise ValueError(f"{self.name} needs the MLP hidden size ({hidden}) to be a multiple of the width ({dim})")
            m = hidden // dim
            per_block = 4 + 2 * m
            shared = FacTShared(dim, rank, self.kind, per_block * len(blocks), device=dev)
            model.petl_fact[str(dim)] = shared
            for k, b in enumerate(blocks):
                i0 = k * per_block

                def mk(site, idx, shared=shared, dim=dim, m=m, dev=dev):
                    return FacTDelta(shared, site, dim, m, scale, dropout, idx, device=dev)

                for site, idx in (("qkv", i0), ("proj", i0), ("fc1", i0 + 4), ("fc2", i0 + 4)):
                    lin = b.linear(site)
                    b.set_linear(site, DeltaLinear(lin, {"fact": mk(site, idx)}, {"fact": slice(0, lin.out_features)}))

    def merge(self, model):
        super().merge(model)
        if hasattr(model, "petl_fact"):
            del model.petl_fact
        return model


@register("fact_tt")
class FacTTT(_FacT):
    kind = "tt"
    default_rank = 8


@register("fact_tk")
class FacTTK(_FacT):
    kind = "tk"
    default_rank = 32
