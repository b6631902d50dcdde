"""E²VPT (Han et al., ICCV 2023; official code ChengHan111/E2VPT ``src/models/vit_prompt/vit_prompt_VK.py``,
``src/models/vit_backbones/vit_changeVK.py`` (``Attention``), ``src/configs/config.py`` (``MODEL.P_VK``),
``src/engine/trainer.py`` (pruning), ``command.txt`` (per-task prompt lengths)).

Two kinds of prompts, on every block (``MODEL.P_VK.DEEP`` / ``DEEP_P`` true in every documented run):

* visual prompts (VPT-Deep, ``NUM_TOKENS_P`` = p): [CLS, P_0, patches] after the position embedding, P_i
  replacing the p prompt slots before block i ≥ 1; U(±√(6/(3·16²+768))) init, dropout 0.1
  (``DROPOUT_P``); 12·p·768 parameters;
* key-value prompts (``NUM_TOKENS`` = n): per block one tensor (heads, n, head_dim) prepended to the keys
  *and* the values of self-attention (``SHARE_PARAM_KV`` true: the same tensor for both;
  ``LAYER_BEHIND`` true: prompts before the image keys), kaiming-uniform init (``ORIGIN_INIT`` 2:
  U(±√(6/(n·head_dim)))), no dropout (``P_VK.DROPOUT`` 0); 12·n·768 parameters (``share_kv: false``:
  separate K and V tensors, 2×).

The classifier reads the CLS token after the final LayerNorm. The official ``train()`` keeps the frozen
encoder in eval mode (no stochastic depth): ``drop_path_off: true``. Prompt lengths per dataset come
from the official ``command.txt`` (its documented VTAB-1k and FGVC runs; ``prompts_per_dataset`` in the
yaml, ``num_prompts`` / ``num_kv`` override): e.g. CIFAR-100 p = 5, n = 5 → 46,080 + 46,080 =
**92,160** trained parameters on ViT-B/16; Caltech101 p = 32, n = 5 → 340,992.

Pruning (``MASK_CLS_TOKEN``): a token mask m (p) and a segment mask M (p × 16) multiply every layer's
visual prompts, P ⊙ m ⊙ tile(M) where segment j of a 768-d prompt is the strided set of dimensions
d ≡ j (mod 16) (the official ``repeat``). ``mask: true`` creates them as trainable tensors initialised
to 1 (+17·p parameters; they are trained with the prompts, as the official stage 1); after that
training, ``importance(model, loader, loss_fn)`` returns the official scores (the mask gradients
averaged over the training batches, model in eval mode; the official pass also takes an optimizer step
per batch because it reuses its training step, ours only scores) and ``masks_to_prune`` the official cascade selection (lowest
scores first, at least 1 token and 4 segments kept). The rewind stage retrains from the same
initialisation with the pruned entries fixed at 0: ``rewind_tokens`` (token indices) and
``rewind_pieces`` ({token: [segments]}), the contents of the official ``*_to_mask.json`` files; the
masks are then constant buffers. The official outer loop, which trains, scores, retrains one model per
(token %, segment %) pair from {10..90} % × {10..90} % and keeps the pair with the best val200 accuracy,
is not automated here (it is 81 runs per task, a sweep over ``rewind_*``); and the official documented
VTAB/FGVC 5-run commands set ``MASK_CLS_TOKEN False`` (no pruning), which is the default here.
Not mergeable (prompts), not the identity at init.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import Method, register
from methods.blocks.dataset_params import dataset_key
from methods.blocks.prefix import PrefixAttention
from methods.blocks.prompts import InsertPrompts, Prompts, ReplacePrompts

PIECES = 16  # official CLS_TOKEN_P_PIECES_NUM


class SharedKV(nn.Module):
    """Per-layer key-value prompts for ``PrefixAttention``: ``forward() -> (P_k, P_v)``, each (n, H·d)."""

    def __init__(self, num: int, heads: int, head_dim: int, shared: bool = True, device=None):
        super().__init__()
        self.num, self.heads, self.head_dim = num, heads, head_dim
        self.kv = nn.Parameter(torch.empty(heads, num, head_dim, device=device))
        self.v = None if shared else nn.Parameter(torch.empty(heads, num, head_dim, device=device))
        if self.kv.device.type != "meta":
            for p in (self.kv, self.v):
                if p is not None:  # official ORIGIN_INIT 2: kaiming-uniform, fan_in = n·head_dim
                    nn.init.kaiming_uniform_(p, a=0, mode="fan_in", nonlinearity="leaky_relu")

    def _flat(self, p: torch.Tensor) -> torch.Tensor:
        return p.permute(1, 0, 2).reshape(self.num, self.heads * self.head_dim)

    def forward(self):
        k = self._flat(self.kv)
        return k, (k if self.v is None else self._flat(self.v))


class PromptMask(nn.Module):
    """Token mask m (p) and segment mask M (p × 16) shared by every layer's visual prompts."""

    def __init__(self, num: int, dim: int, trainable: bool, tokens=(), pieces=None, device=None):
        super().__init__()
        if dim % PIECES:
            raise ValueError(f"e2vpt: prompt width {dim} must be divisible by {PIECES} segments")
        m, M = torch.ones(num, device=device), torch.ones(num, PIECES, device=device)
        if m.device.type != "meta":
            for t in tokens:
                m[int(t)] = 0
            for t, segs in dict(pieces or {}).items():
                for j in segs:
                    M[int(t), int(j)] = 0
        self.reps = dim // PIECES
        if trainable:
            self.token, self.piece = nn.Parameter(m), nn.Parameter(M)
        else:
            self.register_buffer("token", m)
            self.register_buffer("piece", M)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """p: (B, num, dim) -> p ⊙ tile(M) ⊙ m (the official order: segments, then tokens)."""
        return p * self.piece.repeat(1, self.reps).to(p.dtype) * self.token.view(-1, 1).to(p.dtype)


class MaskedPrompts(Prompts):
    """VPT prompts whose (dropped-out) tokens pass through a shared ``PromptMask`` (unregistered here)."""

    def __init__(self, mask: PromptMask, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["_mask"] = mask

    def expand(self, batch: int) -> torch.Tensor:
        return self._mask(super().expand(batch))


@register("e2vpt")
class E2VPT(Method):
    families = ("vit",)

    def lengths(self) -> tuple[int, int]:
        table = {dataset_key(k): v for k, v in dict(self.get("prompts_per_dataset", {})).items()}
        entry = table.get(dataset_key(self.context.get("dataset")), self.get("default", [5, 5]))
        p = self.cfg.get("num_prompts")
        n = self.cfg.get("num_kv")
        p, n = int(entry[0] if p is None else p), int(entry[1] if n is None else n)
        if p < 1 or n < 1:
            raise ValueError(f"e2vpt: need >= 1 visual and key-value prompts (got {p}, {n}); "
                             "set method.num_prompts / method.num_kv")
        return p, n

    def inject(self, model, sites):
        if getattr(model, "global_pool", "token") != "token":
            raise ValueError("e2vpt classifies the class token: use backbone.global_pool=token")
        p, n = self.lengths()
        self.used = {"num_prompts": p, "num_kv": n}
        dim, prefix = sites.embed_dim, sites.num_prefix_tokens
        patch = sites.patch_embed.patch_size
        bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + dim))
        dropout = float(self.get("dropout", 0.1))
        dev = sites.blocks[0].norm1.weight.device
        tokens, pieces = self.get("rewind_tokens", []), self.get("rewind_pieces", {})
        rewind = bool(tokens) or bool(pieces)
        use_mask = bool(self.get("mask", False)) or rewind
        mask = PromptMask(p, dim, trainable=not rewind, tokens=tokens, pieces=pieces, device=dev) if use_mask else None
        if mask is not None:
            model.petl_prompt_mask = mask  # one mask for all layers: state-dict key petl_prompt_mask.*
        for b in sites:
            attn = b.block.attn
            kv = SharedKV(n, attn.num_heads, attn.head_dim, bool(self.get("share_kv", True)), device=dev)
            b.block.attn = PrefixAttention(attn, kv)
            pr = MaskedPrompts(mask, p, dim, bound, dropout, device=dev) if mask is not None else \
                Prompts(p, dim, bound, dropout, device=dev)
            b.extend("tokens", InsertPrompts(pr, prefix) if b.index == 0 else ReplacePrompts(pr, prefix))
            if bool(self.get("drop_path_off", True)):
                b.block.drop_path1, b.block.drop_path2 = nn.Identity(), nn.Identity()

    def describe(self) -> dict:
        return {**super().describe(), **({"lengths_used": self.used} if hasattr(self, "used") else {})}


def importance(model: nn.Module, loader, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``calculate_importance``: the gradients of the loss w.r.t. the token and segment masks,
    averaged over the batches of ``loader`` (the model in eval mode, masks trainable)."""
    mask = model.petl_prompt_mask
    if not isinstance(mask.token, nn.Parameter):
        raise ValueError("e2vpt importance needs the trainable masks (method.mask=true)")
    was = model.training
    model.eval()
    dev = mask.token.device
    tok, pie, n = torch.zeros_like(mask.token), torch.zeros_like(mask.piece), 0
    for x, y in loader:
        mask.token.grad = mask.piece.grad = None
        loss_fn(model(x.to(dev)), y.to(dev)).backward()
        tok += mask.token.grad
        pie += mask.piece.grad
        n += 1
    model.zero_grad(set_to_none=True)
    model.train(was)
    return tok / max(n, 1), pie / max(n, 1)


def masks_to_prune(token_scores: torch.Tensor, piece_scores: torch.Tensor, token_pct: int, piece_pct: int,
                   min_tokens: int = 1, min_pieces: int = 4) -> tuple[list[int], dict[int, list[int]]]:
    """The official selection for one (token %, segment %) pair: int(p·pct/100) tokens with the lowest
    score (capped to keep ``min_tokens``), and in every token the int(16·pct/100) lowest-scored segments
    (capped to keep ``min_pieces``); returns (``rewind_tokens``, ``rewind_pieces``)."""
    p = token_scores.numel()
    nt = min(int(p * token_pct / 100), p - min_tokens)
    npc = min(int(PIECES * piece_pct / 100), PIECES - min_pieces)
    tokens = sorted(int(i) for i in torch.argsort(token_scores, stable=True)[:max(nt, 0)])
    pieces = {t: sorted(int(j) for j in torch.argsort(piece_scores[t], stable=True)[:max(npc, 0)]) for t in range(p)}
    return tokens, pieces
