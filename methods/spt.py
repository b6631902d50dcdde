"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023), ``spt_lora`` and
``spt_adapter``. Official code: ziplab/SPT (read, not copied); spec: specs/spt_snell_arc.md §1, §5, Checks.

Stage 1 (``prepare``, data-dependent): the sensitivity of every eligible scalar is Σ over the first
``sensitivity_batches`` (16) batches of the training split in file order (batch 32, i.e. the first 512
images) of (∂CE/∂w)², CE mean-reduced per batch, as the official ``get_sensitivity``:

* the model is in train mode, so the backbone's own stochastic depth is active (official: drop-path 0.1);
* the head is the model's own freshly initialised head, untrained (official: the same);
* the loss is plain cross-entropy, whatever ``train.label_smoothing`` says (official: plain CE);
* the images are the first batches of the protocol's training split in file order. Official: train800
  even when training on train800val200; our train800val200 starts with train800, so the first 512
  images are the same;
* eligible tensors: every block's q, k, v, proj, fc1, fc2 weights and biases, norm1/norm2 weights and
  biases, and the final norm: 194 tensors, 85,056,000 scalars on ViT-B/16 (72 matrices + 122 vectors).
  Our ViT has a fused qkv linear; q, k and v are its row thirds and are treated as three 768×768
  matrices (and three bias vectors) everywhere, so names, counts and files equal the official ones.

The scores are cached per (backbone, checkpoint, dataset, seed, classes, batches, batch size) under
``cache_dir`` / ``$PETL_BENCH_CACHE`` / ``~/.cache/petl-bench`` in ``spt/sensitivity/`` and reused; the
record says whether they were ``computed`` or ``loaded`` and how long that took.

Stage 2 (allocation): the budget (``method.budget``: ``0.4M``, ``400k`` or a count) is the trainable count
excluding the head and including the always-trained ``cls_token``. Take the global top-τ scalars; per
tensor, with n selected entries:

* a matrix gets the structured module when n ≥ cost/α (α = 10): LoRA cost r·(d_in+d_out), Adapter cost
  2·r·d_out + r + d_out (r = 8; 12,288 / 30,720 and 13,064 / 52,232 on ViT-B/16);
* a vector is tuned whole when n ≥ len/β (β = 5, i.e. 20 %);
* everything else selected is an unstructured sparse delta on exactly those entries.

Deviations from the official allocation, all on purpose:

1. τ is found by bisection (exact, on the float bit pattern of the score threshold), not from the
   official coarse sweep τ ∈ {0.02, …, 1.58}M with "closest budget kept" (which can be far off, §1.5.6).
   Because a matrix turning structured makes the count jump by up to ~50k, τ alone cannot always hit the
   budget; with ``fill: true`` (default) the remaining budget is then filled with the next-ranked entries
   of tensors that stay below their structured/whole thresholds (the type rule still holds for the final
   counts). The result is within ``tolerance`` (2 %) of the budget, usually exact.
2. LayerNorm entries that are selected but do not make their vector whole are not trained, as in the
   official code (only ``nn.Linear`` layers get sparse deltas), but our budget counts only what is
   trained: the official file's ``params`` counts them (LoRA cifar 0.4: 380,909 vs 380,738 trained).
   Loading an official file drops them too and the record gives ``dropped_norm_entries``.
3. ``spt_adapter`` allocates with the Adapter costs; the official Adapter config reads the LoRA
   sensitivity files (budget drift up to +26 %, §1.3). Loading a file whose ``structured_params``
   disagree with this variant's costs logs a warning.
4. The sparse-delta weight gradient is computed elementwise at the nnz positions only
   (``methods.blocks.sparse_delta``), not via the official O(nnz²) diagonal; no ``.cuda()`` calls.
5. Whole-tuned bias vectors of q/k/v are slices of the fused ``qkv.bias``; they are trained as a dense
   delta over the slice (the same function and count; with no weight decay, AdamW steps are identical).

A budget above what the backbone can train (e.g. the default 0.4M on a tiny test ViT) selects
everything, logs a warning and records ``budget_clamped``. The record (``method_info``) gives the
composition: structured matrices/params, whole vectors, sparse entries, cls_token, τ, the relative
budget error. ``export_official()`` writes the selection in the official file layout.

Modules (§1.2), r = 8, both identity at init (``identity_at_init``):

* ``spt_lora`` (parallel): ΔW = B·A, A kaiming-uniform(√5), B = 0, scale 1, no bias. The branch input is
  the linear's input with Dropout(``dropout`` = 0.1, ``methods.blocks.dropout``: p within 2⁻¹⁷) for q/k/v/fc1/fc2 and without dropout for proj;
  each branch output has DropPath(``drop_path`` = 0.1). Mergeable: LoRA and sparse deltas fold exactly.
* ``spt_adapter`` (sequential on the linear's output): h ← h + DP(up(GELU(down(Dropout(h))))) with
  biases, up = 0; proj's adapter is parallel on the attention output (proj's input, no dropout).

Speed (the step must stay ≤ 0.8× ``full`` on ViT-B/16): every branch's input dropout is fused with its
down-projection (``methods.blocks.dropout.dropout_linear``: the mask is applied once, the 1/(1-p) scale on
the r×d weight) and every branch output is accumulated into the frozen linear's output in place with one
rank-r GEMM (``methods.blocks.lora.add_low_rank_``; an adapter's up bias is its (r+1)-th rank), so no branch
makes a tokens×d temporary in forward. Sparse deltas keep only the input columns they need for backward.
Measured (CPU, batch 32): 0.70–0.78× ``full`` over five runs, median 0.72× (results/step_time_spt_runs.md).

Trainable: structured modules, sparse deltas (own 1-D tensors), whole vectors, ``cls_token``, head.
``param_groups``: weight decay only on ≥2-D tensors that are not biases and not ``cls_token`` (official:
no decay on 1-D tensors, biases, cls_token; deltas are 1-D so they get none).

Without data: ``method.sensitivity=PATH`` builds the modules in ``apply`` from an official
``param_req_<budget>.pth`` file (keys in §1.1) or from one of our cached score files (then the budget is
allocated on it). ``mode=params`` without a file (meta device) allocates the budget on a nominal,
seeded synthetic sensitivity, so the printed count is what a run with that budget trains (placement
is arbitrary). On a real device without a file, ``apply`` trains only ``cls_token`` and the head until
``prepare`` injects the modules.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from backbones import Sites, sites as get_sites
from methods.base import Method, NotMergeableError, register
from methods.blocks.dropout import FastDropout, dropout as make_dropout, dropout_linear
from methods.blocks.grad_scores import accumulate_grads
from methods.blocks.lora import LowRank, add_low_rank_
from methods.blocks.sparse_delta import SparseDeltaLinear

log = logging.getLogger(__name__)

OPS = ("q", "k", "v", "proj", "fc1", "fc2")  # official op order of ``tuned_matrices``
_OP_SITE = {"q": "qkv", "k": "qkv", "v": "qkv", "proj": "proj", "fc1": "fc1", "fc2": "fc2"}
_OP_PATH = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_NAME_RE = re.compile(r"^blocks\.(\d+)\.(?:(attn|mlp)\.)?(q|k|v|proj|fc1|fc2|norm1|norm2)\.(weight|bias)$")


# ------------------------------------------------------------------------------------------------
# eligible tensors
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One eligible tensor under its official (sep-qkv) name."""

    name: str
    kind: str  # "matrix" | "vector"
    block: Optional[int]  # None for the final norm
    op: str  # q, k, v, proj, fc1, fc2, norm1, norm2, norm
    part: str  # weight | bias
    row0: int  # first row inside the fused tensor (q/k/v), else 0
    shape: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_norm(self) -> bool:
        return self.op.startswith("norm")

    @property
    def site(self) -> str:
        return _OP_SITE.get(self.op, self.op)


def eligible_entries(s: Sites) -> list[Entry]:
    """The 194 (ViT-B/16) eligible tensors in the official ``named_parameters`` order."""
    out: list[Entry] = []
    for b in s:
        i = b.index
        d = b.dim
        for part in ("weight", "bias"):
            out.append(Entry(f"blocks.{i}.norm1.{part}", "vector", i, "norm1", part, 0, (d,)))
        for op in ("q", "k", "v", "proj"):
            lin = _base(b.linear(_OP_SITE[op]))
            row0 = "qkv".index(op) * d if op in "qkv" else 0
            out.append(Entry(f"blocks.{i}.{_OP_PATH[op]}.weight", "matrix", i, op, "weight", row0, (d, lin.in_features)))
            if lin.bias is not None:
                out.append(Entry(f"blocks.{i}.{_OP_PATH[op]}.bias", "vector", i, op, "bias", row0, (d,)))
        for part in ("weight", "bias"):
            out.append(Entry(f"blocks.{i}.norm2.{part}", "vector", i, "norm2", part, 0, (d,)))
        for op in ("fc1", "fc2"):
            lin = _base(b.linear(op))
            out.append(Entry(f"blocks.{i}.{_OP_PATH[op]}.weight", "matrix", i, op, "weight", 0,
                             (lin.out_features, lin.in_features)))
            if lin.bias is not None:
                out.append(Entry(f"blocks.{i}.{_OP_PATH[op]}.bias", "vector", i, op, "bias", 0, (lin.out_features,)))
    d = s.embed_dim
    norm = s.final_norm
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        for part in ("weight", "bias"):
            out.append(Entry(f"norm.{part}", "vector", None, "norm", part, 0, (d,)))
    return out


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base", module)


def base_tensor(s: Sites, e: Entry) -> torch.Tensor:
    """The model tensor holding ``e`` (the whole fused qkv tensor for q/k/v)."""
    if e.op == "norm":
        mod = s.final_norm
    elif e.is_norm:
        mod = getattr(s.blocks[e.block], e.op)
    else:
        mod = _base(s.blocks[e.block].linear(e.site))
    return getattr(mod, e.part)


def entry_view(t: torch.Tensor, e: Entry) -> torch.Tensor:
    return t[e.row0:e.row0 + e.shape[0]]


# ------------------------------------------------------------------------------------------------
# budget and costs
# ------------------------------------------------------------------------------------------------
def parse_budget(value) -> int:
    """``0.4M`` / ``400k`` / ``400000`` -> 400000. Bare numbers below 1000 are refused as ambiguous."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 1000:
            raise ValueError(f"method.budget={value} is ambiguous: write e.g. {value}M or a parameter count")
        return int(round(value))
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([mMkK]?)\s*", str(value))
    if not m:
        raise ValueError(f"method.budget={value!r} is not a budget: write e.g. 0.4M, 400k or 400000")
    num = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if not m.group(2) and num < 1000:
        raise ValueError(f"method.budget={value} is ambiguous: write e.g. {value}M or a parameter count")
    return int(round(num))


def structured_cost(variant: str, e: Entry, rank: int) -> int:
    d_out, d_in = e.shape
    if variant == "lora":
        return rank * (d_in + d_out)
    return 2 * rank * d_out + rank + d_out  # adapter on the output width (proj: parallel, square)


@dataclass
class Selection:
    structured: set = field(default_factory=set)  # matrix names
    full: set = field(default_factory=set)  # vector names
    sparse: dict = field(default_factory=dict)  # name -> flat indices (LongTensor) inside the entry
    dropped_norm_entries: int = 0
    info: dict = field(default_factory=dict)


def selection_count(sel: Selection, entries: list[Entry], variant: str, rank: int, cls_numel: int) -> dict:
    by = {e.name: e for e in entries}
    structured = sum(structured_cost(variant, by[n], rank) for n in sel.structured)
    full = sum(by[n].numel for n in sel.full)
    sparse = sum(int(v.numel()) for n, v in sel.sparse.items() if not by[n].is_norm)
    return {"structured_params": structured, "full_vector_params": full, "sparse_params": sparse,
            "cls_token": cls_numel, "trainable_excl_head": structured + full + sparse + cls_numel,
            "structured_matrices": len(sel.structured), "full_vectors": len(sel.full)}


class _Allocator:
    """Per-tensor counts n_i(T) = #{scores ≥ T} and the trained total as a function of the counts.

    Scores are non-negative float32, so their int32 bit patterns are ordered like the values. Counts
    at any threshold come from two-level histograms of those bit patterns (high 15 bits once, low 16
    bits of the one bin where the budget is crossed), so the exact bisection costs a few O(n) passes
    instead of sorting 85M scores.
    """

    HI = 16

    def __init__(self, entries, scores, variant, rank, alpha, beta, cls_numel):
        self.entries = entries
        self.bits = [torch.nan_to_num(scores[e.name].reshape(-1).float(), nan=0.0).clamp_min(0.0).view(torch.int32)
                     for e in entries]
        nb = (0x7F800000 >> self.HI) + 1
        hist = torch.stack([torch.bincount((b >> self.HI).long(), minlength=nb).cpu() for b in self.bits])
        self.suffix = hist.flip(1).cumsum(1).flip(1)  # suffix[i, k] = #{bits_i >> HI >= k}
        self.suffix = torch.cat([self.suffix, torch.zeros(len(entries), 1, dtype=self.suffix.dtype)], 1)
        self.sizes = torch.tensor([e.numel for e in entries], dtype=torch.long)
        is_mat = [e.kind == "matrix" for e in entries]
        self.is_mat = torch.tensor(is_mat)
        self.is_norm = torch.tensor([e.is_norm for e in entries])
        self.cost = torch.tensor([structured_cost(variant, e, rank) if m else e.numel for e, m in zip(entries, is_mat)],
                                 dtype=torch.long)
        div = torch.tensor([alpha if m else beta for m in is_mat], dtype=torch.float64)
        # type threshold: structured / whole iff n >= cost/alpha (matrices) or len/beta (vectors)
        self.thr = torch.ceil(self.cost.double() / div).long().clamp(min=1)
        self.cls = cls_numel

    def total(self, n: torch.Tensor) -> int:
        promoted = n >= self.thr
        per = torch.where(promoted, self.cost, torch.where(self.is_norm, torch.zeros_like(n), n))
        return int(per.sum()) + self.cls

    def _search(self, lo: int, hi: int, counts_at, target: int) -> int:
        """Smallest k in (lo, hi] with total(counts_at(k)) <= target, given total(counts_at(hi)) <= target."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.total(counts_at(mid)) <= target:
                hi = mid
            else:
                lo = mid
        return hi

    def allocate(self, target: int, fill: bool = True) -> tuple[torch.Tensor, dict]:
        """Counts per tensor whose trained total is the largest ≤ target (exact bisection on the threshold)."""
        everything = self.sizes.clone()
        if self.total(everything) <= target:
            return everything, {"tau": int(everything.sum()), "clamped": self.total(everything) < target}
        nb = self.suffix.shape[1] - 1
        k = self._search(0, nb, lambda k: self.suffix[:, k], target)  # bins >= k fit, bins >= k-1 do not
        base = self.suffix[:, k]
        lo_bin = k - 1
        low = []
        in_bin = self.suffix[:, lo_bin] - base
        for i, b in enumerate(self.bits):  # low 16 bits of the entries in the crossing bin
            if in_bin[i] == 0:
                low.append(torch.zeros(1 << self.HI, dtype=torch.long))
                continue
            m = (b >> self.HI) == lo_bin
            low.append(torch.bincount((b[m] & 0xFFFF).long(), minlength=1 << self.HI).cpu())
        h2 = torch.stack(low).flip(1).cumsum(1).flip(1)
        h2 = torch.cat([h2, torch.zeros(len(self.bits), 1, dtype=h2.dtype)], 1)
        j = self._search(0, 1 << self.HI, lambda j: base + h2[:, j], target)  # total(base + h2[:, 0]) > target
        n = base + h2[:, j]
        info = {"tau": int(n.sum())}
        remaining = target - self.total(n)
        if fill and remaining > 0:
            n = self._fill(n, remaining)
        return n, info

    def _fill(self, n: torch.Tensor, remaining: int) -> torch.Tensor:
        promoted = n >= self.thr
        vals, owner = [], []
        for i, b in enumerate(self.bits):
            if promoted[i] or self.is_norm[i]:
                continue
            cap = int(self.thr[i]) - 1 - int(n[i])
            if cap <= 0:
                continue
            top = torch.topk(b, min(b.numel(), int(n[i]) + cap)).values  # descending bit patterns
            v = top[int(n[i]):].cpu()
            vals.append(v)
            owner.append(torch.full((v.numel(),), i, dtype=torch.long))
        if not vals:
            return n
        vals, owner = torch.cat(vals), torch.cat(owner)
        k = min(remaining, vals.numel())
        top = torch.topk(vals, k).indices
        return n + torch.bincount(owner[top], minlength=n.numel())


def allocate(entries: list[Entry], scores: dict, budget: int, variant: str, rank: int = 8, alpha: float = 10,
             beta: float = 5, cls_numel: int = 768, fill: bool = True) -> Selection:
    """Global top-τ allocation of ``budget`` trained parameters (see the module docstring)."""
    missing = [e.name for e in entries if e.name not in scores]
    if missing:
        raise ValueError(f"sensitivity scores lack {len(missing)} eligible tensors (e.g. {missing[0]}); recompute them")
    al = _Allocator(entries, scores, variant, rank, alpha, beta, cls_numel)
    n, info = al.allocate(budget, fill)
    sel = Selection()
    for i, e in enumerate(entries):
        k = int(n[i])
        if k == 0:
            continue
        if k >= int(al.thr[i]):
            (sel.structured if e.kind == "matrix" else sel.full).add(e.name)
        elif e.is_norm:
            sel.dropped_norm_entries += k
        else:
            flat = scores[e.name].reshape(-1).float()
            sel.sparse[e.name] = torch.sort(torch.topk(flat.cpu(), k).indices).values
    sel.info = info
    return sel


# ------------------------------------------------------------------------------------------------
# official file format (param_req_<budget>.pth)
# ------------------------------------------------------------------------------------------------
def selection_from_official(d: dict, entries: list[Entry], depth: int) -> Selection:
    need = ("tuned_matrices", "tuned_vectors", "unstructured_name_shapes", "unstructured_indexes")
    miss = [k for k in need if k not in d]
    if miss:
        raise ValueError(f"SPT sensitivity file lacks key(s) {miss}: expected an official param_req_<budget>.pth")
    by = {e.name: e for e in entries}
    tm = d["tuned_matrices"]
    if len(tm) != depth or any(len(row) != len(OPS) for row in tm):
        raise ValueError(f"SPT file's tuned_matrices is {len(tm)}×{len(tm[0]) if tm else 0}; this backbone needs {depth}×6")
    sel = Selection()
    for i, row in enumerate(tm):
        for op, flag in zip(OPS, row):
            if int(flag):
                sel.structured.add(f"blocks.{i}.{_OP_PATH[op]}.weight")
    for name in d["tuned_vectors"]:
        if name not in by:
            raise ValueError(f"SPT file tunes vector '{name}', which this backbone does not have")
        sel.full.add(name)
    shapes = d["unstructured_name_shapes"]
    idx = torch.as_tensor(d["unstructured_indexes"]).reshape(-1).long().cpu()
    sizes = [math.prod(tuple(shapes[n])) for n in shapes]
    total = sum(sizes)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= total):
        raise ValueError(f"SPT file's unstructured_indexes exceed the {total} entries of unstructured_name_shapes")
    mask = torch.zeros(total, dtype=torch.bool)
    mask[idx] = True
    start = 0
    for name, size in zip(shapes, sizes):
        part = mask[start:start + size]
        start += size
        nz = part.nonzero().reshape(-1)
        if nz.numel() == 0:
            continue
        if name not in by:
            raise ValueError(f"SPT file has unstructured entries in '{name}', which this backbone does not have")
        if tuple(shapes[name]) != by[name].shape:
            raise ValueError(f"SPT file's shape {tuple(shapes[name])} for '{name}' differs from the backbone's {by[name].shape}")
        if by[name].is_norm:
            sel.dropped_norm_entries += int(nz.numel())  # official: LN entries are never trained
        else:
            sel.sparse[name] = nz
    sel.info = {"file_params": d.get("params"), "file_structured_params": d.get("structured_params"),
                "file_unstructured_params": d.get("unstructured_params")}
    return sel


def selection_to_official(sel: Selection, entries: list[Entry], variant: str, rank: int, cls_numel: int,
                          depth: int) -> dict:
    """Our selection in the official file layout (loadable by ziplab/SPT's ``train_spt.py``)."""
    tm = [[0] * len(OPS) for _ in range(depth)]
    for n in sel.structured:
        m = _NAME_RE.match(n)
        tm[int(m.group(1))][OPS.index(m.group(3))] = 1
    shapes, offset, indexes = {}, 0, []
    for e in entries:
        if e.name in sel.structured or e.name in sel.full:
            continue
        shapes[e.name] = torch.Size(e.shape)
        if e.name in sel.sparse:
            indexes.append(sel.sparse[e.name] + offset)
        offset += e.numel
    idx = torch.cat(indexes) if indexes else torch.zeros(0, dtype=torch.long)
    c = selection_count(sel, entries, variant, rank, cls_numel)
    return {
        "tuned_matrices": tm,
        "tuned_vectors": [e.name for e in entries if e.name in sel.full],
        "unstructured_name_shapes": shapes,
        "unstructured_name_shapes_int": {n: math.prod(s) for n, s in shapes.items()},
        "unstructured_indexes": idx,
        "unstructured_params": int(idx.numel()),
        "structured_params": c["structured_params"] + c["full_vector_params"],
        "params": c["trainable_excl_head"] / 1e6,
    }


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
def LoRABranch(d_in, d_out, rank, dropout, drop_path, device=None) -> LowRank:
    """DP(B·A·Dropout(x)), A kaiming-uniform(√5), B = 0, scale 1, no bias (official StructuredTuningModule):
    the shared ``LowRank`` with alpha = rank. DropPath acts on the rank-r intermediate (it scales whole
    samples, so B·DP(A·z) = DP(B·A·z), with an r-wide instead of a d_out-wide multiply)."""
    return LowRank(d_in, d_out, rank, alpha=rank, dropout=dropout, device=device, drop_path=drop_path)


class AdapterBranch(nn.Module):
    """DP(up(GELU(down(Dropout(h))))), down: PyTorch default init (kaiming-uniform √5, uniform bias),
    up weight and bias 0 (official).

    up(a) = [a, 1]·[W_up, b_up]ᵀ, and DropPath scales whole samples, so the branch is the rank-(r+1) product
    DP([a, 1])·[W_up, b_up]ᵀ: ``add_to`` accumulates it into the linear's output in place."""

    def __init__(self, dim, rank, dropout, drop_path, device=None):
        super().__init__()
        self.down = nn.Linear(dim, rank, device=device)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = make_dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _hidden(self, h):
        a = self.act(dropout_linear(h, self.down.weight, self.down.bias, self.dropout))
        return self.drop_path(torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)), \
            torch.cat([self.up.weight, self.up.bias[:, None]], 1)

    def forward(self, h):
        return F.linear(*self._hidden(h))

    def add_to(self, y, h, cols: slice):
        return add_low_rank_(y, *self._hidden(h), cols)

    @property
    def saves_input(self) -> bool:
        """Whether the forward keeps ``h`` itself for backward (no active dropout: down saves its input)."""
        return not (isinstance(self.dropout, FastDropout) and self.dropout.active)


class SPTLinear(SparseDeltaLinear):
    """A frozen linear with SPT's sparse deltas plus structured branches on output-row slices.

    ``source[name]``: ``input`` (branch reads the linear's input and adds to the slice: LoRA, proj
    adapter) or ``output`` (branch reads the slice of the output and adds to it: sequential adapter).
    """

    def __init__(self, base, weight_index=None, bias_index=None, branches=None, slices=None, sources=None):
        super().__init__(base, weight_index, bias_index)
        self.branches = nn.ModuleDict(dict(branches or {}))
        self.slices = dict(slices or {})
        self.sources = dict(sources or {})

    def forward(self, x):
        lead = x.shape[:-1]
        y = self.forward_flat(x.reshape(-1, x.shape[-1]))  # tokens × out, not a view
        # every branch accumulates into y in place (one rank-r GEMM each, no tokens×out temporaries). The
        # output slices are disjoint; a branch reading its slice of y gets a copy when it would keep that
        # view for backward (y is written afterwards). Branch inputs keep the batch dim (DropPath is per sample)
        for n, br in self.branches.items():
            s = self.slices[n]
            if self.sources[n] == "input":
                inp = x
            else:
                inp = y.view(*lead, y.shape[-1])[..., s]
                inp = inp.clone() if torch.is_grad_enabled() and br.saves_input else inp
            y = br.add_to(y, inp, s)
        return y.view(*lead, y.shape[-1])

    def merged(self) -> nn.Linear:
        if any(not hasattr(b, "delta_weight") for b in self.branches.values()):
            raise NotMergeableError("SPT adapter branches are non-linear and cannot be merged")
        self.fold_into_base()
        with torch.no_grad():
            for n, br in self.branches.items():
                self.base.weight[self.slices[n]] += br.delta_weight().to(self.base.weight.dtype)
        return self.base


def build_modules(model: nn.Module, sel: Selection, entries: list[Entry], variant: str, rank: int,
                  dropout: float, drop_path: float) -> None:
    s = get_sites(model)
    by = {e.name: e for e in entries}
    for b in s:
        for site in ("qkv", "proj", "fc1", "fc2"):
            lin = b.linear(site)
            if isinstance(lin, SparseDeltaLinear):
                raise RuntimeError(f"SPT modules are already built on {b.linear_path(site)}")
            ops = ("q", "k", "v") if site == "qkv" else (site,)
            widx, bidx, branches, slices, sources = [], [], {}, {}, {}
            for op in ops:
                wname = f"blocks.{b.index}.{_OP_PATH[op]}.weight"
                bname = f"blocks.{b.index}.{_OP_PATH[op]}.bias"
                e = by[wname]
                rows = slice(e.row0, e.row0 + e.shape[0])
                if wname in sel.structured:
                    dev = lin.weight.device
                    if variant == "lora":
                        branches[op] = LoRABranch(e.shape[1], e.shape[0], rank, 0.0 if op == "proj" else dropout,
                                                  drop_path, device=dev)
                        sources[op] = "input"
                    else:
                        branches[op] = AdapterBranch(e.shape[0], rank, 0.0 if op == "proj" else dropout, drop_path,
                                                     device=dev)
                        sources[op] = "input" if op == "proj" else "output"
                    slices[op] = rows
                elif wname in sel.sparse:
                    widx.append(sel.sparse[wname] + e.row0 * e.shape[1])
                if bname in sel.full:
                    bidx.append(torch.arange(e.shape[0]) + e.row0)
                elif bname in sel.sparse:
                    bidx.append(sel.sparse[bname] + e.row0)
            if widx or bidx or branches:
                b.set_linear(site, SPTLinear(lin, torch.cat(widx) if widx else None, torch.cat(bidx) if bidx else None,
                                             branches, slices, sources))
    for name in sel.full:
        e = by[name]
        if e.is_norm:
            base_tensor(s, e).requires_grad_(True)
    if getattr(model, "cls_token", None) is not None:
        model.cls_token.requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# sensitivity
# ------------------------------------------------------------------------------------------------
def compute_sensitivity(model: nn.Module, entries: list[Entry], loader, batches: int) -> tuple[dict, int]:
    """Σ over ``batches`` batches of (∂CE_mean/∂w)² for every eligible tensor; (scores, images used)."""
    s = get_sites(model)
    tensors, seen = [], set()
    for e in entries:
        t = base_tensor(s, e)
        if id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)
    # plain mean CE per batch (official), train mode
    acc, images = accumulate_grads(model, tensors, loader, lambda m, x, y: F.cross_entropy(m(x), y), batches,
                                   square=True)
    by_id = {id(t): a for t, a in zip(tensors, acc)}
    scores = {e.name: entry_view(by_id[id(base_tensor(s, e))], e).detach().float().cpu().clone() for e in entries}
    return scores, images


def synthetic_scores(entries: list[Entry], seed: int = 0) -> dict:
    """A nominal sensitivity: per-tensor scales 10^U(-3, 3) times uniform noise (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in entries:
        scale = 10 ** (torch.rand((), generator=g).item() * 6 - 3)
        out[e.name] = torch.rand(e.shape, generator=g) * scale
    return out


def cache_root(context: dict) -> Path:
    root = context.get("cache_dir") or os.environ.get("PETL_BENCH_CACHE") or Path.home() / ".cache" / "petl-bench"
    return Path(root)


def sensitivity_key(model: nn.Module, entries: list[Entry], context: dict, batches: int) -> Optional[dict]:
    """What the scores depend on; None (no caching) outside a run (no dataset/backbone in context)."""
    if not context.get("dataset") or not context.get("backbone"):
        return None
    ckpt = context.get("checkpoint")
    ck = None
    if ckpt:
        p = Path(str(ckpt)).expanduser()
        ck = {"path": str(p.resolve()) if p.exists() else str(ckpt),
              "size": p.stat().st_size if p.exists() else None}
    w = base_tensor(get_sites(model), entries[2]).detach().double()  # cheap weight fingerprint
    return {"backbone": context["backbone"], "checkpoint": ck, "dataset": context["dataset"],
            "seed": context.get("seed"), "num_classes": context.get("num_classes"), "batches": batches,
            "structure": hashlib.sha1(json.dumps([(e.name, e.shape) for e in entries]).encode()).hexdigest()[:12],
            "fingerprint": [round(float(w.sum()), 6), round(float((w * w).sum()), 6)]}


def sensitivity_path(context: dict, key: dict) -> Path:
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    ds = str(key["dataset"]).replace("/", "__")
    return cache_root(context) / "spt" / "sensitivity" / str(key["backbone"]) / ds / f"seed{key['seed']}-{h}.pt"


# ------------------------------------------------------------------------------------------------
# the methods
# ------------------------------------------------------------------------------------------------
class _SPT(Method):
    families = ("vit",)
    needs_prepare = True
    identity_at_init = True
    variant = "lora"

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.rank = int(self.get("rank", 8))
        self.alpha = float(self.get("alpha", 10))
        self.beta = float(self.get("beta", 5))
        self.budget = parse_budget(self.get("budget", "0.4M"))
        self.tolerance = float(self.get("tolerance", 0.02))
        self.fill = bool(self.get("fill", True))
        self.batches = int(self.get("sensitivity_batches", 16))
        self.dropout = float(self.get("dropout", 0.1))
        self.drop_path = float(self.get("drop_path", 0.1))
        if self.rank < 1 or self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"method.rank/alpha/beta must be positive (got {self.rank}/{self.alpha}/{self.beta})")
        self.built = False
        self.info: dict = {}

    # -- apply ----------------------------------------------------------------------------
    def inject(self, model, sites):
        self.entries = eligible_entries(sites)
        self.depth = len(sites)
        cls = getattr(model, "cls_token", None)
        self.cls_numel = cls.numel() if cls is not None else 0
        if cls is not None:
            cls.requires_grad_(True)  # always trained in SPT
        path = self.get("sensitivity")
        if path:
            self._from_file(model, Path(str(path)).expanduser())
        elif next(model.parameters()).device.type == "meta":
            sel = allocate(self.entries, synthetic_scores(self.entries), self.budget, self.variant, self.rank,
                           self.alpha, self.beta, self.cls_numel, self.fill)
            self._build(model, sel, {"sensitivity": "nominal (synthetic, no data)"})

    def _from_file(self, model, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"method.sensitivity={path}: no such file (give an SPT param_req_<budget>.pth "
                                    f"or a petl-bench SPT score file)")
        d = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(d, dict):
            raise ValueError(f"method.sensitivity={path}: not an SPT sensitivity file (expected a dict)")
        if "scores" in d:
            sel = allocate(self.entries, d["scores"], self.budget, self.variant, self.rank, self.alpha, self.beta,
                           self.cls_numel, self.fill)
            self._build(model, sel, {"sensitivity": "file (scores)", "sensitivity_path": str(path)})
            return
        sel = selection_from_official(d, self.entries, self.depth)
        info = {"sensitivity": "file (official param_req)", "sensitivity_path": str(path), **sel.info}
        self._build(model, sel, info, official=True)

    def _build(self, model, sel: Selection, info: dict, official: bool = False):
        build_modules(model, sel, self.entries, self.variant, self.rank, self.dropout, self.drop_path)
        counts = selection_count(sel, self.entries, self.variant, self.rank, self.cls_numel)
        self.selection = sel
        self.built = True
        self.info = {**info, **counts, "dropped_norm_entries": sel.dropped_norm_entries}
        if official:
            fs = sel.info.get("file_structured_params")
            mine = counts["structured_params"] + counts["full_vector_params"]
            if fs is not None and int(fs) != mine:
                log.warning("SPT file's structured_params=%s but %s modules cost %d: the file was made for another "
                            "structured type (e.g. the official Adapter config reading LoRA files)", fs,
                            self.variant, mine)
                self.info["file_variant_mismatch"] = True
        else:
            got = counts["trainable_excl_head"]
            self.info.update({"budget_requested": self.budget, "budget_rel_error": (got - self.budget) / self.budget,
                              "tau": sel.info.get("tau")})
            if sel.info.get("clamped"):
                log.warning("SPT budget %d exceeds what this backbone can train (%d): everything selected",
                            self.budget, got)
                self.info["budget_clamped"] = True
            elif abs(got - self.budget) > self.tolerance * self.budget:
                log.warning("SPT allocation trains %d parameters, %.1f%% off the budget %d", got,
                            100 * (got - self.budget) / self.budget, self.budget)

    # -- prepare --------------------------------------------------------------------------
    def prepare(self, model, train_loader, loss_fn) -> dict:
        if self.built:
            return dict(self.info)
        key = sensitivity_key(model, self.entries, self.context, self.batches)
        if key is not None:
            key["batch_size"] = getattr(train_loader, "batch_size", None)
        path = sensitivity_path(self.context, key) if key else None
        t0 = time.perf_counter()
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            scores, images, status = saved["scores"], saved.get("images"), "loaded"
        else:
            # the pass draws dropout/drop-path masks: keep the global RNGs where a cache hit leaves them, so
            # a run that computes the sensitivity and one that loads it train identically (and resume exactly)
            from bench.state import preserved_rng

            with preserved_rng():
                scores, images = compute_sensitivity(model, self.entries, train_loader, self.batches)
            status = "computed"
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save({"scores": scores, "key": key, "images": images}, tmp)
                os.replace(tmp, path)
        elapsed = time.perf_counter() - t0
        sel = allocate(self.entries, scores, self.budget, self.variant, self.rank, self.alpha, self.beta,
                       self.cls_numel, self.fill)
        self._build(model, sel, {"sensitivity": status, "sensitivity_s": elapsed,
                                 "sensitivity_path": str(path) if path else None, "sensitivity_images": images})
        return dict(self.info)

    def selection_state(self):
        return {"selection": self.selection if self.built else None, "info": dict(self.info)}

    def load_selection(self, model, state):
        if not self.built:  # built in apply (method.sensitivity=FILE) on every rank alike otherwise
            self._build(model, state["selection"], {})
        self.info = dict(state["info"])

    # -- optimisation ---------------------------------------------------------------------
    def param_groups(self, model, lr, weight_decay):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            flat = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in ("cls_token", "pos_embed")
            (no_decay if flat else decay).append(p)
        return [g for g in ({"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}) if g["params"]]

    def export_official(self) -> dict:
        """The current selection as an official ``param_req`` dict (after ``apply``/``prepare``)."""
        if not self.built:
            raise RuntimeError("SPT selection is not built yet: call prepare (or give method.sensitivity)")
        return selection_to_official(self.selection, self.entries, self.variant, self.rank, self.cls_numel, self.depth)


@register("spt_lora")
class SPTLoRA(_SPT):
    variant = "lora"
    mergeable = True


@register("spt_adapter")
class SPTAdapter(_SPT):
    variant = "adapter"
    mergeable = False
