"""Learnable key/value prefixes for self-attention (prefix tuning and U-Tuning's parallel prefix).

``PrefixTable`` produces one layer's prefix keys and values P_k, P_v (L×dim each), either as direct
parameters or through Li & Liang's re-parameterisation MLP (E → Linear → tanh → Linear → [P_k, P_v]).
``PrefixAttention`` replaces a timm ``Attention`` and prepends the prefixes to the keys and values
(queries, hence the output length, unchanged). It adopts the original module's children under the same
names, so the backbone's state-dict keys stay ``blocks.i.attn.qkv.*`` / ``blocks.i.attn.proj.*``.
``ParallelPrefix`` is the parallel form (U-Tuning): softmax(q P_kᵀ/√d) P_v through the frozen output
projection, added beside the frozen attention (no gate λ).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PREFIX_INITS = ("normal", "xavier")
PREFIX_REPARAMS = ("none", "mlp")


class PrefixTable(nn.Module):
    """One layer's prefixes: ``forward() -> (P_k, P_v)``, each (L, dim).

    ``reparam='none'``: P_k, P_v are the parameters (2·L·dim). ``init='normal'``: N(0, std²);
    ``init='xavier'``: U(±√(6/(L+dim))).
    ``reparam='mlp'``: an embedding E (L×dim, N(0, 1) as ``nn.Embedding``) through Linear(dim→mid) → tanh
    → Linear(mid→2·dim) (PyTorch default Linear init), as the V-PETL video prefix file; the MLP output is
    a function of parameters only, so after training it can be cached and the stored model holds 2·L·dim.
    """

    def __init__(self, num: int, dim: int, reparam: str = "none", init: str = "normal", std: float = 0.02,
                 mid_dim: int = 64, device=None):
        super().__init__()
        if num < 1:
            raise ValueError(f"prefix length must be >= 1 (got {num}); set method.num_prefix")
        if reparam not in PREFIX_REPARAMS:
            raise ValueError(f"unknown prefix reparam '{reparam}' (set method.reparam to none or mlp)")
        if init not in PREFIX_INITS:
            raise ValueError(f"unknown prefix init '{init}' (set method.init to normal or xavier)")
        self.num, self.dim, self.reparam = num, dim, reparam
        meta = torch.device(device or "cpu").type == "meta"
        if reparam == "none":
            self.key = nn.Parameter(torch.empty(num, dim, device=device))
            self.value = nn.Parameter(torch.empty(num, dim, device=device))
            if not meta:
                for p in (self.key, self.value):
                    if init == "normal":
                        nn.init.normal_(p, 0.0, std)
                    else:
                        bound = math.sqrt(6.0 / (num + dim))
                        nn.init.uniform_(p, -bound, bound)
        else:
            self.embed = nn.Parameter(torch.empty(num, dim, device=device))
            self.mlp = nn.Sequential(nn.Linear(dim, mid_dim, device=device), nn.Tanh(),
                                     nn.Linear(mid_dim, 2 * dim, device=device))
            if not meta:
                nn.init.normal_(self.embed)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reparam == "none":
            return self.key, self.value
        kv = self.mlp(self.embed)
        return kv[:, : self.dim], kv[:, self.dim:]


def _heads(p: torch.Tensor, batch: int, heads: int, dtype) -> torch.Tensor:
    """(L, H·d) -> (B, H, L, d)."""
    n, dim = p.shape
    return p.to(dtype).reshape(n, heads, dim // heads).permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)


class PrefixAttention(nn.Module):
    """timm ``Attention`` with prefixes prepended to keys and values: K' = [P_k; K], V' = [P_v; V].

    The prefixes get no position embedding and no mask; ``q_norm``/``k_norm`` act on the image keys only
    (Identity on ViT-B). Attention masks are not supported (ViT classification uses none).
    ``prefix=None``: no prefixes. ``query_only=T``: the first T tokens of the sequence only query (their keys
    and values are dropped), so no other token attends to them (VQT's query tokens).
    """

    def __init__(self, attn: nn.Module, prefix: PrefixTable | None, query_only: int = 0):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("prefix tuning does not support gated attention (timm Attention gated=True)")
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.gate = None
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.fused_attn = attn.fused_attn
        self.prefix = prefix
        self.query_only = query_only

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("prefix attention does not support attention masks")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.query_only:
            k, v = k[:, :, self.query_only:], v[:, :, self.query_only:]
        if self.prefix is not None:
            pk, pv = self.prefix()
            k = torch.cat([_heads(pk, B, self.num_heads, k.dtype), k], dim=2)
            v = torch.cat([_heads(pv, B, self.num_heads, v.dtype), v], dim=2)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


class ParallelPrefix(nn.Module):
    """U-Tuning's parallel prefix for the ``attn_parallel`` extension point: (x, h) ->
    Concat_h[softmax(q_h P_k,hᵀ/√d) P_v,h] · W_projᵀ with q = W_q·h + b_q from the frozen qkv and the
    frozen projection weight without its bias (the frozen attention already adds it).

    The frozen ``attn`` is referenced, not registered, so it is neither duplicated in the state dict nor
    counted twice.
    """

    def __init__(self, attn: nn.Module, prefix: PrefixTable):
        super().__init__()
        self.__dict__["_attn"] = attn  # unregistered reference to the frozen attention
        self.prefix = prefix

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        a = self._attn
        B, N, _ = h.shape
        dim = a.num_heads * a.head_dim
        w, b = a.qkv.weight[:dim], (a.qkv.bias[:dim] if a.qkv.bias is not None else None)
        q = F.linear(h, w, b).reshape(B, N, a.num_heads, a.head_dim).transpose(1, 2)
        q = a.q_norm(q)
        pk, pv = self.prefix()
        pk, pv = _heads(pk, B, a.num_heads, q.dtype), _heads(pv, B, a.num_heads, q.dtype)
        out = ((q * a.scale) @ pk.transpose(-2, -1)).softmax(dim=-1) @ pv
        out = out.transpose(1, 2).reshape(B, N, dim)
        return F.linear(out, a.proj.weight)
