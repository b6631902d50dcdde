"""PiSSA, principal singular values and singular vectors adaptation (Meng et al., NeurIPS 2024).

Official code: GraphPKU/PiSSA (HEAD 87f4db6) ``utils/init_pissa.py`` + ``scripts/*/run_pissa.sh``, which call the
PiSSA initialisation merged into HF PEFT (``LoraLayer.pissa_init``, ``init_lora_weights="pissa"`` or
``"pissa_niter_<k>"``). LoRA's structure, y = W_res x + s·B A x, with a different init: for each adapted weight
W (out×in), W = U S Vᵀ (``torch.linalg.svd``, reduced), and with s = α/r

    A = diag(√(S_r/s)) V_rᵀ  (r×in),   B = U_r diag(√(S_r/s))  (out×r),   W_res = W − s·B A = W − U_r S_r V_rᵀ,

so the trained factors hold the r principal singular components and the frozen residual holds the rest; the
model computes the same function at step 0 up to float rounding (W_res + s·BA = W, |Δlogits| ~ 1e-6, so
``identity_at_init`` is False: not bit-identical). ``merge`` folds s·BA back into the residual weight.

Sites: the official scripts adapt every linear of the transformer block (LLaMA q/k/v/o and gate/up/down); on our
blocks that is q, k, v (slices of the fused qkv, each decomposed on its own rows, as PEFT would on separate
projections), proj, fc1 and fc2. r = α = 8 (scale 1; the official LLM runs use r = α = 128 on 4096-wide models;
there is no official vision setting, and 8 is this suite's LoRA rank). ViT-B/16:
12·(3·2·768·8 + 2·768·8 + 2·8·(768 + 3072)) = 1,327,104. ``targets: [q, v]`` gives LoRA's sites (294,912).
Dropout 0 (the official advice: dropping principal components is harmful).

Deviations: ``svd_niter: null`` (default) is the exact SVD (PEFT ``"pissa"``); the official run scripts use the
randomised fast SVD ``pissa_niter_16`` (``svd_niter: 16`` = ``torch.svd_lowrank(W, r, niter=16)``, as PEFT), which
approximates it. The rank is ours (see above). Mergeable; Swin has the same linears (ConvNeXt has no q/k/v/proj).
"""
from __future__ import annotations

import torch

from methods.base import Method, register
from methods.blocks.lora import DeltaLinear, LowRank, qkv_slices

QKV = ("q", "k", "v")
LINEARS = ("proj", "fc1", "fc2")


def principal_init(delta: LowRank, w: torch.Tensor, niter=None) -> torch.Tensor:
    """Set ``delta``'s factors to the r principal components of ``w`` (out×in); return the residual weight."""
    r, s = delta.rank, delta.scale
    w32 = w.detach().float()
    if niter is None:
        u, sv, vh = torch.linalg.svd(w32, full_matrices=False)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:
        u, sv, v = torch.svd_lowrank(w32, q=r, niter=int(niter))
        vh = v.t()
    root = torch.sqrt(sv / s)
    with torch.no_grad():
        delta.A.copy_(root[:, None] * vh)
        delta.B.copy_(u * root[None, :])
        return (w32 - s * (delta.B @ delta.A)).to(w.dtype)


@register("pissa")
class PiSSA(Method):
    families = ("vit", "swin")
    mergeable = True

    def inject(self, model, sites):
        rank, alpha = int(self.get("rank", 8)), self.get("alpha")
        targets = list(self.get("targets", [*QKV, *LINEARS]))
        niter = self.get("svd_niter")
        bad = [t for t in targets if t not in QKV + LINEARS]
        if bad:
            raise ValueError(f"pissa: unknown target(s) {bad}; choose among q, k, v, proj, fc1, fc2")
        for b in sites:
            qkv_t = [t for t in targets if t in QKV]
            groups = [("qkv", qkv_slices(b.dim, qkv_t))] if qkv_t else []
            groups += [(t, {t: slice(None)}) for t in targets if t in LINEARS]
            for site, slices in groups:
                lin = b.linear(site)
                deltas = {}
                for t, rows in slices.items():
                    w = lin.weight[rows]
                    d = LowRank(w.shape[1], w.shape[0], rank, alpha, device=lin.weight.device)
                    if lin.weight.device.type != "meta":
                        with torch.no_grad():
                            lin.weight[rows] = principal_init(d, w, niter)
                    deltas[t] = d
                b.set_linear(site, DeltaLinear(lin, deltas, slices))
