"""GPS: Gradient-based Parameter Selection (Zhang et al., CVPR 2024). Official code: FightingFighting/GPS
(``train_gps.py``, ``utils/pruning.py``; read, not copied). Spec: specs/vpetl_image.md §4.

What the official code does, and what we do:

* **Scores.** One pass over the training loader accumulates the gradients of a supervised-contrastive
  loss (``SupConLoss``, ``--contrastive``) on the model's features into ``param.grad`` (summed over
  batches, model in train mode); the score of a weight is |Σ_b ∂L_b/∂w|. We do the same with
  ``loss: supcon`` (default): SupCon (Khosla et al. 2020, temperature 0.07 = base temperature) on the
  L2-normalised pre-logits features (class token after the final norm). Deviation: the official loader
  gives two *augmented* views per image; our prepare loader is deterministic, so the two views are two
  stochastic forward passes of the same images (the backbone's stochastic depth differs between them).
  ``loss: ce`` scores with the cross-entropy of the model's head instead.
* **Selection.** For every weight matrix (patch-embedding conv flattened to 768×(3·16·16), each block's
  qkv (fused; its rows are q, k, v rows, so per-row selection is the same as on split q/k/v), proj,
  fc1, fc2), keep the top-``k`` input connections of each output neuron (row) by score. k = 1 on
  ViT-B/16: 768 + 12·(2304 + 768 + 3072 + 768) = 83,712 weights.
* **Trainable.** The selected weights, every non-norm bias (patch-embed, qkv, proj, fc1, fc2:
  83,712 on ViT-B/16) and the head; norms, pos-embed and cls-token frozen. 167,424 excl. head for k = 1.
  The count is structural (k per row), so ``mode=params`` gives it without data.
* **Update.** Official: full weights with a gradient mask (a dense weight gradient and optimiser state
  for every matrix). Ours: the selected entries are sparse deltas (``methods.blocks.sparse_delta``:
  no dense weight gradient for the linears; the patch-embed conv, 768×768, goes through a dense
  scatter, a transient 590k-entry gradient). With AdamW and no weight decay on the deltas (we give them
  none, the official recipe uses wd 0) the update is the same. Biases are trained in place.

Before ``prepare`` the deltas sit on placeholder positions (the first k columns of each row) with the
same count; ``prepare`` moves them to the selected positions (the deltas are still zero). Identity at
init (deltas 0, biases unchanged); ``merge`` folds the deltas into the weights.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register, unfreeze
from methods.blocks.grad_scores import accumulate_grads
from methods.blocks.merge import WrapsLinear
from methods.blocks.sparse_delta import SparseDeltaLinear, scatter_delta

log = logging.getLogger(__name__)
LINEARS = ("qkv", "proj", "fc1", "fc2")


class SparseDeltaConv(WrapsLinear, nn.Module):
    """A frozen conv plus a sparse delta on flat weight positions (autograd through a dense scatter)."""

    def __init__(self, base: nn.Conv2d, weight_index: torch.Tensor):
        super().__init__()
        self.base = base
        weight_index = weight_index.reshape(-1).long()
        if weight_index.device.type != "meta":
            weight_index = torch.sort(weight_index).values
        self.register_buffer("weight_index", weight_index.to(base.weight.device))
        self.delta = nn.Parameter(torch.zeros(weight_index.numel(), device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x):
        w = scatter_delta(self.base.weight, self.weight_index, self.delta)
        return self.base._conv_forward(x, w, self.base.bias)

    def merged(self) -> nn.Conv2d:
        with torch.no_grad():
            self.base.weight.copy_(scatter_delta(self.base.weight, self.weight_index, self.delta))
        return self.base


def topk_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions of the top-k entries of every row of a 2-D score (k clamped to the row length)."""
    k = min(k, score.shape[1])
    cols = torch.topk(score, k, dim=1).indices
    rows = torch.arange(score.shape[0], device=score.device).unsqueeze(1)
    return (rows * score.shape[1] + cols).reshape(-1)


def placeholder_index(rows: int, cols: int, k: int, device=None) -> torch.Tensor:
    k = min(k, cols)
    r = torch.arange(rows).unsqueeze(1) * cols
    return (r + torch.arange(k).unsqueeze(0)).reshape(-1).to(device)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), features: [batch, views, dim] L2-normalised."""
    b, v, _ = features.shape
    f = features.transpose(0, 1).reshape(b * v, -1)  # view-major, as the reference implementation
    lab = labels.repeat(v)
    logits = f @ f.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    self_mask = torch.eye(b * v, dtype=torch.bool, device=f.device)
    pos = (lab.unsqueeze(0) == lab.unsqueeze(1)) & ~self_mask
    exp = torch.exp(logits).masked_fill(self_mask, 0.0)
    log_prob = logits - torch.log(exp.sum(1, keepdim=True))
    npos = pos.sum(1)
    keep = npos > 0
    mean_pos = (log_prob * pos).sum(1)[keep] / npos[keep]
    return -(temperature / base_temperature) * mean_pos.mean()


@register("gps")
class GPS(Method):
    families = ("vit",)
    needs_prepare = True
    mergeable = True
    identity_at_init = True

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.k = int(self.get("k", 1))
        self.loss = str(self.get("loss", "supcon"))
        self.temperature = float(self.get("temperature", 0.07))
        self.batches = self.get("batches")
        if self.k < 1:
            raise ValueError(f"method.k must be >= 1 (got {self.k})")
        if self.loss not in ("supcon", "ce"):
            raise ValueError(f"method.loss={self.loss}: choose supcon (official) or ce")

    def _targets(self, model, sites):
        """(parent module, attribute) of every selectable weight module."""
        out = [(model.patch_embed, "proj")]
        for b in sites:
            for name in LINEARS:
                parent, attr = b._parent(name)
                out.append((parent, attr))
        return out

    def inject(self, model, sites):
        self.sites = sites
        for parent, attr in self._targets(model, sites):
            mod = getattr(parent, attr)
            w = mod.weight
            rows, cols = w.shape[0], w[0].numel()
            setattr(parent, attr, self._wrap(mod, placeholder_index(rows, cols, self.k)))
            if mod.bias is not None:
                unfreeze([mod.bias])

    @staticmethod
    def _wrap(mod, index):
        base = getattr(mod, "base", mod)
        if isinstance(base, nn.Conv2d):
            return SparseDeltaConv(base, index)
        return SparseDeltaLinear(base, weight_index=index)

    def _features(self, model, x):
        return F.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=-1)

    def prepare(self, model, train_loader, loss_fn) -> dict:
        t0 = time.perf_counter()
        targets = self._targets(model, self.sites)
        for parent, attr in targets:  # score the plain frozen layers (the wrappers give no weight gradient)
            setattr(parent, attr, getattr(parent, attr).base)
        weights = [getattr(p, a).weight for p, a in targets]

        def loss_of(m, x, y):
            if self.loss == "supcon":
                f = torch.stack([self._features(m, x), self._features(m, x)], dim=1)
                return supcon_loss(f, y, self.temperature)
            return F.cross_entropy(m(x), y)

        # summed gradient over batches in train mode (official calculate_gradient: accumulated .grad)
        acc, n_img = accumulate_grads(model, weights, train_loader, loss_of,
                                      None if self.batches is None else int(self.batches))
        zero = 0
        self.selected = []
        for (parent, attr), a in zip(targets, acc):
            score = a.abs().reshape(a.shape[0], -1)
            zero += int((score.sum(1) == 0).sum())
            mod = getattr(parent, attr)
            setattr(parent, attr, self._wrap(mod, topk_per_row(score, self.k)))
            self.selected.append(getattr(parent, attr).weight_index.detach().cpu())
        if zero:
            log.warning("GPS: %d output rows got an all-zero gradient score (ties broken by column order)", zero)
        return {"gps_loss": self.loss, "gps_images": n_img, "gps_zero_rows": zero, "gps_s": time.perf_counter() - t0}

    def selection_state(self):
        return getattr(self, "selected", None)

    def load_selection(self, model, state):
        for (parent, attr), idx in zip(self._targets(model, self.sites), state):
            setattr(parent, attr, self._wrap(getattr(parent, attr), idx))

    def param_groups(self, model, lr, weight_decay):
        deltas = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("delta")]
        ids = {id(p) for p in deltas}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [g for g in ({"params": rest, "weight_decay": weight_decay}, {"params": deltas, "weight_decay": 0.0})
                if g["params"]]
