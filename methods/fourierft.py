"""FourierFT (Gao et al., ICML 2024; official code Chaos96/fourierft
``peft/src/peft/tuners/fourier/layer.py`` and ``experiments/ViT/*.bash``).

ΔW = α·Re(IDFT2(S)): S is zero except at n fixed spectral positions holding the trained real
coefficients c ∈ Rⁿ; ``torch.fft.ifft2`` normalises by 1/(d1·d2). As the official ViT scripts:
n = 3000 per adapted matrix, α (``scale``) = 300, ``--share_entry``: one index set shared by every
layer, ``randperm(d1·d2)`` under a CPU generator seeded with ``entry_seed`` = 2024 (row = idx // d2,
column = idx % d2); c ~ N(0, 1) (from the run's global RNG), so ΔW ≠ 0 at init (per-entry std
α·√(n/2)/(d1·d2) ≈ 0.0197 on ViT-B) and the model is *not* equal to the frozen one at step 0
(``init: zeros`` gives ΔW = 0). On a matrix with fewer than n entries (tiny test backbones) every
entry is trained, with a warning. The indices are a non-persistent buffer (regenerated from the seed,
gone after ``merge``), never parameters.

Orientation: the official forward computes x @ ΔW, i.e. ΔW is (in × out); we keep that forward, so
the weight-space delta folded by ``merge`` is ΔWᵀ (the official ``merge`` adds ΔW untransposed, which
disagrees with its own forward for non-symmetric ΔW: a bug we do not reproduce). The official code
assumes square matrices (in × in); we use in × out, identical for q and v.
The official recipe trains the coefficients and the head with separate learning rates (e.g. 0.2 and
7e-4 on CIFAR-100); ``coef_lr`` sets the coefficients' rate (null: one rate for all, the engine default).
Targets: q and v of the fused qkv (the official ViT runs adapt HF ``query`` and ``value``).
ViT-B/16: 12·2·3000 = 72,000 trainable coefficients.
"""
import warnings

import torch
from torch import nn

from methods.base import Method, register
from methods.blocks.lora import DeltaLinear, qkv_slices


def spectral_indices(n: int, d1: int, d2: int, seed: int) -> torch.Tensor:
    """(2, n) row/column indices of the trained spectral entries, reproducible from ``seed``."""
    if n < 1:
        raise ValueError(f"fourierft: n_frequency={n} must be >= 1; set method.n_frequency")
    if n > d1 * d2:  # a small backbone: every spectral entry is trained
        warnings.warn(f"fourierft: n_frequency={n} exceeds the {d1}x{d2}={d1 * d2} spectral entries; using all of them")
        n = d1 * d2
    flat = torch.randperm(d1 * d2, generator=torch.Generator(device="cpu").manual_seed(int(seed)))[:n]
    return torch.stack([flat // d2, flat % d2])


class FourierDelta(nn.Module):
    def __init__(self, indices: torch.Tensor, in_f: int, out_f: int, scale: float, init: str = "randn", device=None):
        super().__init__()
        if init not in ("randn", "zeros"):
            raise ValueError(f"fourierft: unknown init '{init}' (set method.init to randn or zeros)")
        self.register_buffer("indices", indices.to(device), persistent=False)
        self.in_f, self.out_f, self.scale = in_f, out_f, float(scale)
        n = indices.shape[1]
        self.spectrum = nn.Parameter(torch.zeros(n, device=device))
        if init == "randn" and self.spectrum.device.type != "meta":
            nn.init.normal_(self.spectrum)

    def delta_in_out(self) -> torch.Tensor:
        """ΔW as the official code uses it: (in × out), applied as x @ ΔW."""
        dense = torch.zeros(self.in_f, self.out_f, dtype=torch.float32, device=self.spectrum.device)
        dense = dense.index_put((self.indices[0], self.indices[1]), self.spectrum.float())
        return torch.fft.ifft2(dense).real * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.delta_in_out().to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.delta_in_out().t()


def split_lr_groups(model: nn.Module, own: list, lr, weight_decay: float):
    """Two AdamW groups, the method's own tensors at ``lr`` and every other trainable tensor (the head)
    at the run's lr; both with the run's weight decay. None (engine default groups) when ``lr`` is None."""
    if lr is None:
        return None
    ids = {id(p) for p in own}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [g for g in ({"params": list(own), "lr": float(lr), "weight_decay": weight_decay},
                        {"params": rest, "weight_decay": weight_decay}) if g["params"]]


@register("fourierft")
class FourierFT(Method):
    families = ("vit", "video_vit")
    mergeable = True

    def inject(self, model, sites):
        targets = list(self.get("targets", ["q", "v"]))
        n, scale = int(self.get("n_frequency", 3000)), float(self.get("scale", 300.0))
        init, seed = str(self.get("init", "randn")), int(self.get("entry_seed", 2024))
        shared = bool(self.get("share_entry", True))
        for b in sites:
            qkv = b.linear("qkv")
            slices = qkv_slices(b.dim, targets)
            deltas = {}
            for j, t in enumerate(targets):
                # share_entry: the same index set everywhere; otherwise one seeded set per matrix
                s = seed if shared else seed + 1000 * b.index + j
                idx = spectral_indices(n, b.dim, b.dim, s)
                deltas[t] = FourierDelta(idx, b.dim, b.dim, scale, init, device=qkv.weight.device)
            b.set_linear("qkv", DeltaLinear(qkv, deltas, slices))

    def param_groups(self, model, lr, weight_decay):
        """``coef_lr`` set: the official split learning rates (spectral coefficients 0.2-0.3, head ~1e-3)."""
        own = [m.spectrum for m in model.modules() if isinstance(m, FourierDelta)]
        return split_lr_groups(model, own, self.get("coef_lr"), weight_decay)
