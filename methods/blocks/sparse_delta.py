"""Unstructured sparse deltas on a frozen linear: y = x (W + scatter(Δ))ᵀ + (b + scatter(Δ_b)).

Used by SPT (its "unstructured tuning") and GPS (top-k input connections per output neuron). The
pretrained ``W`` and ``b`` stay frozen; the trainable tensors are 1-D ``delta`` (one entry per selected
weight position, zero at init) and ``bias_delta`` (one entry per selected bias position, zero at init).

The weight gradient is computed only at the selected positions, by a custom autograd function:

    dL/dΔ_k = Σ_tokens g[..., row_k] · x[..., col_k]

No dense d_out×d_in weight gradient is ever formed, and neither is the nnz×nnz product of SPT's official
``LinearSPTSparseGrad`` (it takes the diagonal of an nnz×nnz matrix, O(nnz²) memory; see
specs/spt_snell_arc.md §1.5 item 8). The route is picked per call (``_route``):

* ``block`` (SPT's usual case): the positions' distinct rows U and columns V span a sub-block of at most
  1/``BLOCK_RATIO`` of the matrix; the delta acts as a dense |U|×|V| matrix in three small GEMMs. On ViT-B/16
  with sensitivity-selected positions |U|·|V| is 0-3 % of the matrix, so a sparse linear costs about what
  the frozen one does.
* ``regular`` / ``gather``: few positions and few tokens: the contribution is gathered elementwise
  (GPS's k positions per row use a reshape-sum).
* ``dense``: W + scatter(Δ) formed in forward and recomputed in backward (one d_out×d_in temporary, never
  saved); the gradient is an elementwise gather-product-sum over the tokens in chunks of positions (the
  temporary is at most ``CHUNK_ELEMS`` numbers).

With Δ = 0 the output is bit-identical to the frozen linear (W + 0 = W exactly, then the same
``F.linear``). ``merged()`` folds the deltas into the base linear exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.blocks.merge import WrapsLinear, write_bias_

CHUNK_ELEMS = 1 << 22  # largest (tokens × positions) temporary in the delta gradient


def scatter_delta(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + scatter(Δ) out of place: ``index`` are flat positions into ``weight``."""
    return weight.reshape(-1).index_add(0, index, delta.to(weight.dtype)).view_as(weight)


def sparse_delta_grad(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Σ_n g[n, rows_k] · x[n, cols_k] for every k (g: N×out, x: N×in), chunked over k, in fp32."""
    n = max(1, g.shape[0])
    step = max(1, CHUNK_ELEMS // n)
    out = torch.empty(rows.numel(), dtype=torch.float32, device=g.device)
    g32, x32 = g.float(), x.float()
    for start in range(0, rows.numel(), step):
        r, c = rows[start:start + step], cols[start:start + step]
        out[start:start + step] = (g32.index_select(1, r) * x32.index_select(1, c)).sum(0)
    return out


def _use_gather(nnz: int, numel: int, tokens: int) -> bool:
    """Add Δ's contribution by gathering (O(tokens·nnz) random accesses, forward and backward) only when that
    is cheaper than forming W + scatter(Δ) (O(numel), once in forward and once in backward): few positions
    AND few tokens. At ViT-B batch 32 (6,304 tokens) the dense form wins for all but a handful of positions."""
    return nnz * GATHER_RATIO <= numel and nnz * tokens <= numel * TOKEN_BUDGET


GATHER_RATIO = 16
TOKEN_BUDGET = 1.0  # gather while tokens·nnz ≤ TOKEN_BUDGET·numel


def regular_delta_grad(g: torch.Tensor, x: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    """``sparse_delta_grad`` when row r owns positions r·k … r·k+k-1 (no gather of g), chunked over rows."""
    n, out = g.shape
    step = max(1, CHUNK_ELEMS // max(1, n * k))
    res = torch.empty(out, k, dtype=torch.float32, device=g.device)
    g32, x32, c = g.float(), x.float(), cols.view(out, k)
    for r in range(0, out, step):
        xs = x32.index_select(1, c[r:r + step].reshape(-1)).view(n, -1, k)
        res[r:r + step] = (g32[:, r:r + step].unsqueeze(-1) * xs).sum(0)
    return res.reshape(-1)


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x (W + scatter(Δ))ᵀ + b, the frozen ``W`` never getting a gradient. Four exact routes, cheapest first:

    * ``block``: the positions lie in a small |U|×|V| sub-block (U: their rows, V: their columns). Then
      y[..., U] += x[..., V] D_sub ᵀ, grad_x[..., V] += g[..., U] D_sub and dL/dΔ = (g_Uᵀ x_V) at the positions:
      three N×|U|×|V| GEMMs instead of gathers over N×nnz. Sensitivity-based selection (SPT) concentrates on a
      few rows and columns (gradient² ≈ ‖g_i‖²·‖x_j‖²), so |U|·|V| is a few % of d_out·d_in.
    * ``regular``: exactly k positions per row (GPS's top-k per neuron): a reshape-sum of gathered inputs.
    * ``gather``: few positions and few tokens: y[..., r_k] += Δ_k · x[..., c_k].
    * ``dense``: W + scatter(Δ) formed in forward and recomputed in backward (never saved), the gradient
      gathered elementwise at the positions.
    """

    @staticmethod
    def forward(ctx, x, delta, bias, weight, index, rows, cols, row_k=0, block=None):
        tokens = x.numel() // max(1, x.shape[-1])
        ctx.route = _route(index.numel(), weight.numel(), tokens, row_k, block)
        ctx.has_bias, ctx.row_k, ctx.x_dtype = bias is not None, row_k, x.dtype
        ctx.block = block if ctx.route == "block" else None
        w = weight.to(x.dtype)
        if ctx.route == "block":
            # only x's |V| columns are needed for dL/dΔ: save those, not x
            u, v, loc = block
            xv = x.index_select(-1, v)
            ctx.save_for_backward(xv, delta, weight, index, rows, cols)
            y = F.linear(x, w, bias)
            return y.index_add_(-1, u, F.linear(xv, _sub_block(delta, block).to(x.dtype)).to(y.dtype))
        ctx.save_for_backward(x, delta, weight, index, rows, cols)
        if ctx.route == "regular":
            y = F.linear(x, w, bias)
            xs = x.index_select(-1, cols).view(*x.shape[:-1], weight.shape[0], row_k)
            return y.add_((xs * delta.to(x.dtype).view(-1, row_k)).sum(-1).to(y.dtype))
        if ctx.route == "gather":
            y = F.linear(x, w, bias)
            return y.index_add_(-1, rows, (x.index_select(-1, cols) * delta.to(x.dtype)).to(y.dtype))
        return F.linear(x, scatter_delta(weight, index, delta).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, g):
        x, delta, weight, index, rows, cols = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        route, k = ctx.route, ctx.row_k
        g_u = None
        if route == "block":
            u, v, loc = ctx.block
            g_u = g2.index_select(1, u)
        if ctx.needs_input_grad[0]:
            if route == "dense":
                gx = g2 @ scatter_delta(weight, index, delta).to(g2.dtype)
            else:
                gx = g2 @ weight.to(g2.dtype)
                d = delta.to(g2.dtype)
                if route == "block":
                    gx.index_add_(-1, v, g_u @ _sub_block(delta, ctx.block).to(g2.dtype))
                elif route == "regular":
                    gx.index_add_(-1, cols, (g2.unsqueeze(-1) * d.view(-1, k)).reshape(g2.shape[0], -1))
                else:
                    gx.index_add_(-1, cols, g2.index_select(-1, rows) * d)
            grad_x = gx.view(*g.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if route == "block":
                sub = g_u.t().float() @ x2.float()  # x2 holds x's columns V
                grad_delta = sub.reshape(-1).index_select(0, loc).to(delta.dtype)
            elif k:
                grad_delta = regular_delta_grad(g2, x2, cols, k).to(delta.dtype)
            else:
                grad_delta = sparse_delta_grad(g2, x2, rows, cols).to(delta.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.float().sum(0)
        return grad_x, grad_delta, grad_bias, None, None, None, None, None, None


def _sub_block(delta: torch.Tensor, block) -> torch.Tensor:
    """The |U|×|V| dense sub-block of scatter(Δ)."""
    u, v, loc = block
    return delta.new_zeros(u.numel() * v.numel()).index_put_((loc,), delta).view(u.numel(), v.numel())


def _route(nnz: int, numel: int, tokens: int, row_k: int, block) -> str:
    if block is not None and block[0].numel() * block[1].numel() * BLOCK_RATIO <= numel:
        return "block"
    if _use_gather(nnz, numel, tokens):
        return "regular" if row_k else "gather"
    return "dense"


BLOCK_RATIO = 4  # the sub-block route while |U|·|V| ≤ d_out·d_in / BLOCK_RATIO


def sub_block_index(rows: torch.Tensor, cols: torch.Tensor):
    """(U, V, loc): the sorted distinct rows and columns of the positions, and each position's flat index
    into the |U|×|V| block. None on the meta device."""
    if rows.device.type == "meta" or rows.numel() == 0:
        return None
    u, v = torch.unique(rows), torch.unique(cols)
    loc = torch.searchsorted(u, rows) * v.numel() + torch.searchsorted(v, cols)
    return u, v, loc


class SparseDeltaLinear(WrapsLinear, nn.Module):
    """A frozen ``base`` linear plus trainable sparse deltas on chosen weight and bias positions.

    ``weight_index``: flat positions into ``base.weight`` (row·in_features + col);
    ``bias_index``: positions into ``base.bias``. Either may be empty/None. Indices are stored
    sorted and unique (duplicates are a caller bug and raise).
    """

    def __init__(self, base: nn.Linear, weight_index: Optional[torch.Tensor] = None,
                 bias_index: Optional[torch.Tensor] = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = base.weight.device
        wi = self._check(weight_index, base.weight.numel(), "weight_index", dev)
        bi = self._check(bias_index, base.bias.numel() if base.bias is not None else 0, "bias_index", dev)
        if bi.numel() and base.bias is None:
            raise ValueError("bias_index given but the base linear has no bias")
        self.register_buffer("weight_index", wi, persistent=True)
        self.register_buffer("rows", torch.div(wi, self.in_features, rounding_mode="floor"), persistent=False)
        self.register_buffer("cols", wi % self.in_features, persistent=False)
        self.register_buffer("bias_index", bi, persistent=True)
        self.delta = nn.Parameter(torch.zeros(wi.numel(), device=dev, dtype=base.weight.dtype)) if wi.numel() else None
        self.row_k = self._row_regular(wi, self.out_features, self.in_features)
        block = sub_block_index(self.rows, self.cols)
        for name, t in zip(("block_rows", "block_cols", "block_loc"), block or (None, None, None)):
            self.register_buffer(name, t, persistent=False)
        self.bias_delta = nn.Parameter(torch.zeros(bi.numel(), device=dev, dtype=base.weight.dtype)) if bi.numel() else None

    @staticmethod
    def _row_regular(index: torch.Tensor, out: int, inp: int) -> int:
        """k when the sorted positions hold exactly k entries of every row (GPS's top-k per neuron), else 0."""
        n = index.numel()
        if n == 0 or n % out or index.device.type == "meta":
            return 0
        k = n // out
        rows = torch.div(index, inp, rounding_mode="floor")
        return k if torch.equal(rows, torch.arange(out, device=index.device).repeat_interleave(k)) else 0

    @staticmethod
    def _check(index, size: int, what: str, device) -> torch.Tensor:
        if index is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.device.type != "meta" and index.numel():
            index = torch.sort(index).values
            if index[0] < 0 or index[-1] >= size:
                raise ValueError(f"{what} out of range [0, {size})")
            if (index[1:] == index[:-1]).any():
                raise ValueError(f"{what} has duplicate positions")
        return index.to(device)


    @property
    def nnz(self) -> int:
        return self.weight_index.numel() + self.bias_index.numel()

    def effective_bias(self) -> Optional[torch.Tensor]:
        b = self.base.bias
        if self.bias_delta is None:
            return b
        return b.index_add(0, self.bias_index, self.bias_delta.to(b.dtype))

    def effective_weight(self) -> torch.Tensor:
        if self.delta is None:
            return self.base.weight
        return scatter_delta(self.base.weight, self.weight_index, self.delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_flat(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)

    def forward_flat(self, x2: torch.Tensor) -> torch.Tensor:
        """The output for a 2-D input (tokens × in), as a fresh tensor (not a view: callers may add into it)."""
        b = self.effective_bias()
        if self.delta is None:
            return F.linear(x2, self.base.weight, b)
        block = None if self.block_rows is None else (self.block_rows, self.block_cols, self.block_loc)
        return _SparseDeltaLinear.apply(x2, self.delta, b, self.base.weight, self.weight_index, self.rows, self.cols,
                                        self.row_k, block)

    def fold_into_base(self) -> None:
        with torch.no_grad():
            if self.delta is not None:
                self.base.weight.copy_(self.effective_weight())
            if self.bias_delta is not None:
                write_bias_(self.base, self.effective_bias())

    def merged(self) -> nn.Linear:
        self.fold_into_base()
        return self.base

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight_nnz={self.weight_index.numel()}, bias_nnz={self.bias_index.numel()}"
