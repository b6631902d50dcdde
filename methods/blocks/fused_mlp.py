"""Memory-lean MLP branches: fold the frozen op in front of fc1 / fc2 into the trained branch.

A branch trained on a frozen linear must keep that linear's *input* for its own weight gradient, while the
frozen linear alone keeps nothing. On a ViT MLP, ``fc2(GELU(u))`` with a branch on fc2 therefore keeps
GELU(u) (hidden-wide, 3072/token on ViT-B) next to the u GELU keeps for its own backward, and
``fc1(norm2(x))`` with a branch on fc1 keeps norm2(x) next to the x LayerNorm keeps. Here the frozen op
(``pre``) moves *into* the following linear:

* ``mlp.act`` becomes a ``Deferred`` stand-in (identity) and fc2 becomes a ``PreDeltaLinear`` that
  computes ``base(GELU(u)) + branch`` with the branch given u and ``pre = GELU``;
* ``norm2`` (ConvNeXt: ``norm``) becomes a ``Deferred`` stand-in that holds the same LayerNorm
  parameters (state-dict keys unchanged) and passes x through; fc1 becomes a ``PreDeltaLinear`` computing
  ``base(LN(x)) + branch`` with ``pre = LN``.

The frozen path ``base(pre(x))`` is one autograd function (``_FrozenPreLinear``) that saves only x, the
tensor the pre-op would save anyway (GELU: its input; LayerNorm: its input, the per-token mean and rstd are
recomputed); its backward runs the pre-op's backward in place on its own g·W buffer, a chunk of tokens at a
time. The branch gets ``pre`` through ``KernelDeltaFn``, which saves x (the same tensor, so no new memory),
rebuilds pre(x) in backward and also ends with the in-place pre-op backward. Nothing hidden-wide or
norm2-output-sized is stored beyond what LoRA stores, and backward holds one hidden-wide gradient per
path. Forward values are the same operations on the same inputs as the unfused form, so outputs are
bitwise equal; gradients with respect to x differ only by float summation order (the unfused form sums
the two paths before one LayerNorm/GELU backward, the fused form runs that backward once per path), ~1e-7
relative.

Used only where it is safe, else the block is left unfused (``fuse_mlp`` returns which parts it fused):
the MLP is timm's ``Mlp`` (fc1 → act → drop1 → norm → fc2 → drop2) with ``drop1`` inactive (p = 0) and
``norm`` an ``Identity``; ``act`` is GELU (``nn.GELU`` with either ``approximate``, timm's ``GELU`` /
``GELUTanh``); the norm is a frozen ``nn.LayerNorm`` (timm's ``LayerNorm`` without fast-norm) and the block
has no ``mlp_*`` extension (those receive norm2's output, which the stand-in no longer produces); fc1/fc2 are
``DeltaLinear`` over frozen linears. ``merge_wrappers`` restores the plain modules: each ``Deferred`` returns
the original module from ``merged()``, each ``PreDeltaLinear`` folds its deltas into its base linear.
Caveat: an ``mlp_*`` extension added to a block *after* it was fused would receive x, not norm2(x).

Not in the official SNELL code (its branches sit on the linears under ``torch.utils.checkpoint``); this is a
memory-only change (vit_b16, batch 32, CPU step benchmark: SNELL-32 peak 1.06× LoRA's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.blocks.lora import DeltaLinear, add_into_


class Deferred(nn.Module):
    """Identity stand-in for a frozen LayerNorm / GELU whose work moved into the next linear.

    Registers the original's parameters under the same names (so state-dict keys do not change) and keeps
    the original module itself unregistered; ``run(x)`` computes what the original computes (``F.layer_norm``
    / ``F.gelu``, the same calls as the modules' own forwards); ``merged()`` hands the original back,
    re-pointed to the same parameter objects."""

    def __init__(self, original: nn.Module, kind: str, approximate: str = "none"):
        super().__init__()
        if kind not in ("layer_norm", "gelu"):
            raise ValueError(f"Deferred: unknown kind '{kind}' (layer_norm | gelu)")
        object.__setattr__(self, "original", original)
        self.kind, self.approximate = kind, approximate
        for n, p in original.named_parameters(recurse=False):
            setattr(self, n, p)
        if kind == "layer_norm":
            self.normalized_shape, self.eps = tuple(original.normalized_shape), original.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer_norm":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.gelu(x, approximate=self.approximate)

    def run_backward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """∂L/∂x given g = ∂L/∂run(x), without building run(x) (the parameters are frozen: no gradient)."""
        if self.kind == "layer_norm":
            shape = list(self.normalized_shape)
            _, mean, rstd = torch.native_layer_norm(x, shape, self.weight, self.bias, self.eps)
            return torch.ops.aten.native_layer_norm_backward(g, x, shape, mean, rstd, self.weight, self.bias,
                                                             [True, False, False])[0]
        return torch.ops.aten.gelu_backward(g, x, approximate=self.approximate)

    def run_backward_(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``run_backward`` written into ``g`` (contiguous, same dtype as x), ``ROWS`` tokens at a time: both
        ops act row by row, so this is exact, and no second tokens × d buffer is made."""
        x2, g2 = x.reshape(-1, x.shape[-1]), g.view(-1, g.shape[-1])
        for r in range(0, g2.shape[0], ROWS):
            g2[r:r + ROWS] = self.run_backward(x2[r:r + ROWS], g2[r:r + ROWS])
        return g

    def merged(self) -> nn.Module:
        for n, p in self.named_parameters(recurse=False):
            setattr(self.original, n, p)
        return self.original

    def extra_repr(self) -> str:
        return f"deferred {type(self.original).__name__}: applied inside the next linear"


ROWS = 512  # tokens per chunk of the in-place pre-op backward


class _FrozenPreLinear(torch.autograd.Function):
    """y = base(pre(x)) for a frozen base linear and a ``Deferred`` pre-op, saving only x (which the pre-op
    would save anyway). Backward: ∂L/∂pre(x) = g·W is our own fresh buffer, so the pre-op's backward
    overwrites it in place (``run_backward_``): one tokens × d_in buffer instead of two."""

    @staticmethod
    def forward(ctx, x2, pre, weight, bias):
        with torch.no_grad():
            y = F.linear(pre.run(x2), weight, bias)
        ctx.save_for_backward(x2, weight)
        ctx.pre = pre
        return y

    @staticmethod
    def backward(ctx, g):
        x2, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        gh = g @ weight.to(g.dtype)
        return ctx.pre.run_backward_(x2, gh.to(x2.dtype)), None, None, None


class PreDeltaLinear(DeltaLinear):
    """``DeltaLinear`` whose input comes before a frozen op: y = base(pre(x)) + Σ delta(x, pre=pre).

    Same sub-modules as the ``DeltaLinear`` it replaces (``base``, ``deltas``: same state-dict keys); the
    ``Deferred`` stand-in that computes pre is referenced, not registered (it is registered in the block)."""

    def __init__(self, lin: DeltaLinear, pre: Deferred):
        super().__init__(lin.base, lin.deltas, lin.slices)
        object.__setattr__(self, "pre", pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self.pre.run
        # tokens × out, a fresh tensor (deltas add into it in place); pre(x) is not kept
        y = _FrozenPreLinear.apply(x.reshape(-1, x.shape[-1]), self.pre, self.base.weight, self.base.bias)
        for name, delta in self.deltas.items():
            y = add_into_(y, delta(x, pre=run), self.slices[name])
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"pre={self.pre.kind}"


def gelu_approximation(act: nn.Module):
    """The ``approximate`` of a GELU module we know (``nn.GELU``, timm's ``GELU`` / ``GELUTanh``), else None."""
    from timm.layers import activations as ta

    if type(act) is nn.GELU:
        return act.approximate
    if type(act) is ta.GELU:
        return "none"
    if type(act) is getattr(ta, "GELUTanh", None):
        return "tanh"
    return None


def _frozen(*mods: nn.Module) -> bool:
    return all(not p.requires_grad for m in mods for p in m.parameters())


def _plain_layer_norm(norm: nn.Module) -> bool:
    from timm.layers import norm as tn

    if type(norm) is nn.LayerNorm:
        return norm.elementwise_affine
    if type(norm) is tn.LayerNorm:  # timm's subclass: F.layer_norm unless fast-norm is on
        return norm.elementwise_affine and not getattr(norm, "_fast_norm", False)
    return False


def _inactive(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0)


def fuse_mlp(block: nn.Module, norm_attr: str) -> tuple[str, ...]:
    """Fuse ``block.<norm_attr>`` into fc1 and ``mlp.act`` into fc2 where safe; returns the fused parts
    (a subset of ``("fc1", "fc2")``; empty = the block is left as it was)."""
    from timm.layers import Mlp

    mlp = getattr(block, "mlp", None)
    if type(mlp) is not Mlp or getattr(mlp, "use_conv", False) or not isinstance(mlp.fc1, DeltaLinear):
        return ()
    done = []
    approx = gelu_approximation(mlp.act)
    if (approx is not None and _inactive(mlp.drop1) and isinstance(mlp.norm, nn.Identity)
            and type(mlp.fc2) is DeltaLinear and _frozen(mlp.fc2.base)):
        mlp.act = Deferred(mlp.act, "gelu", approx)
        mlp.fc2 = PreDeltaLinear(mlp.fc2, mlp.act)
        done.append("fc2")
    norm = getattr(block, norm_attr, None)
    ext = getattr(block, "petl", {})
    if (norm is not None and _plain_layer_norm(norm) and _frozen(norm) and type(mlp.fc1) is DeltaLinear
            and _frozen(mlp.fc1.base) and not any(k.startswith("mlp_") for k in ext)):
        stand_in = Deferred(norm, "layer_norm")
        setattr(block, norm_attr, stand_in)
        mlp.fc1 = PreDeltaLinear(mlp.fc1, stand_in)
        done.insert(0, "fc1")
    return tuple(done)
