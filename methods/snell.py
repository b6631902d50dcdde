"""SNELL (Shen et al., NeurIPS 2024): sparse tuning with kernelised LoRA (official: ssfgunner/SNELL).

What the official ViT code does (``BlockSNELLParallel``) and what we do:

* one kernelised branch (``methods.blocks.kernel_lora``) on every linear of every block: q, k, v, proj,
  fc1, fc2. Our ViT has a fused qkv linear; q, k, v get three separate 768→768 branches added to the
  three output-row slices, so shapes and counts equal the official separate linears;
* ΔW_ij = 0.1·‖A₁[i] − B₁[j]‖ − 0.1·‖A₂[i] − B₂[j]‖ (α fixed, not trained, as the code; the paper calls
  them learnable), A/B kaiming-uniform(a=√5): ΔW ≠ 0 at init, so SNELL is not identity at step 0;
* competition-based sparsification every forward (train and eval), s = ``sparsity`` = fraction zeroed,
  code form ΔW·stopgrad(|ΔW|·1[|ΔW|>τ]); ``sparse_form: paper`` switches to eq. 5; s = 0 is KLoRA.
  ``sparsity: auto`` takes the official per-task VTAB value (SNELL-32 scripts) from ``sparsity_table``;
* input dropout 0.1 on q/k/v/fc1/fc2 (not proj) and DropPath 0.1 on every branch output; the dropout
  masks take 16 random bits per element (``methods.blocks.dropout``), so p sits on a 2⁻¹⁶ grid (0.1 → 0.100006);
* cls_token trained (as the official keyword list), LayerNorms, biases, pos_embed frozen;
* ΔW is rebuilt in backward (custom autograd function instead of the official checkpoint; same memory,
  and, unlike the official reentrant checkpoint, every factor gets a gradient on backbones whose
  block input does not require grad: the official code trains nothing but the head on Swin/ConvNeXt).
* ``fuse: true`` (default; not in the official code, memory only): norm2 is folded into fc1's branch and
  the GELU into fc2's (``methods.blocks.fused_mlp``), so the branches keep the LayerNorm's / GELU's
  *input* (which those ops keep anyway) instead of their outputs: saved activations drop to LoRA's
  level (vit_b16, batch 4: 310 MiB vs LoRA-(q,v) 308 MiB; unfused 449 MiB). Logits are bitwise equal to
  ``fuse: false``, gradients equal up to float summation order (≤ 2e-7 on the tiny test ViT); the
  state-dict keys do not change and ``merge`` restores plain norm2/act/fc1/fc2. Blocks where fusing is
  not safe (another MLP layout, activation or norm, an active MLP dropout, ``mlp_*`` extensions) stay
  unfused; ``describe()`` reports ``fused_mlp_blocks``.

Counts on ViT-B/16 excl. head (incl. cls_token 768): r=8 1,327,872; r=16 2,654,976; r=32 5,309,184.

The branches are written against the ``Sites`` linear API (``linear_names``/``linear``/``set_linear``;
a fused qkv is detected by out = 3·in): Swin gets q/k/v/proj/fc1/fc2 branches (q, k, v on the fused qkv
output, as the official Swin code), ConvNeXt the two pointwise MLP linears. Checked on a snapshot of
main with the Swin/ConvNeXt families: Swin-B SNELL-8/32 1,732,608 / 6,930,432 and ConvNeXt-B
1,443,840 / 5,775,360 excl. head (the official counts), every factor gets a gradient on both (the
official code: none). Deviation on ConvNeXt: the official keyword rule also trains ``head.norm`` (the
final LayerNorm, part of the backbone here); we keep it frozen. ``merge`` folds ΔW^s into the
frozen weights (exact in eval mode: dropout and DropPath off, the quantile rule is deterministic).
"""
from __future__ import annotations

from methods.base import Method, register
from methods.blocks.fused_mlp import fuse_mlp
from methods.blocks.kernel_lora import KernelDelta
from methods.blocks.lora import DeltaLinear, qkv_slices

SITES = ("qkv", "proj", "fc1", "fc2")

# Official VTAB-1k ``--init_thres`` of the SNELL-32 scripts (0 = KLoRA), keyed by dataset base name.
VTAB_SPARSITY = {
    "cifar100": 0.9, "caltech101": 0.4, "dtd": 0.995, "oxford_flowers102": 0.9, "oxford_iiit_pet": 0.5,
    "svhn": 0.0, "sun397": 0.99, "patch_camelyon": 0.15, "eurosat": 0.5, "resisc45": 0.0,
    "diabetic_retinopathy": 0.5, "clevr_count": 0.1, "clevr_dist": 0.74, "dmlab": 0.0, "kitti": 0.37,
    "dsprites_loc": 0.0, "dsprites_ori": 0.88, "smallnorb_azi": 0.0, "smallnorb_ele": 0.08,
}
ALIASES = {"cifar": "cifar100", "caltech": "caltech101", "flowers102": "oxford_flowers102",
           "pets": "oxford_iiit_pet", "camelyon": "patch_camelyon", "resisc": "resisc45",
           "retinopathy": "diabetic_retinopathy", "kitti_dist": "kitti"}


@register("snell")
class SNELL(Method):
    families = ("vit", "swin", "convnext", "video_vit", "video_swin")  # written against the Sites linear API; tested on all three
    mergeable = True

    def sparsity_for(self) -> float:
        s = self.get("sparsity", 0.0)
        if str(s) != "auto":
            return float(s)
        table = {**VTAB_SPARSITY, **dict(self.get("sparsity_table", {}) or {})}
        ds = str(self.context.get("dataset") or "")
        base = ds.rsplit("/", 1)[-1]
        base = ALIASES.get(base, base)
        if base not in table:
            raise ValueError(f"method.sparsity=auto: no official value for dataset '{ds}'; "
                             f"set method.sparsity=S or add it to method.sparsity_table")
        return float(table[base])

    def inject(self, model, sites):
        rank = int(self.get("rank", 32))
        sparsity, form = self.sparsity_for(), str(self.get("sparse_form", "code"))
        dropout, drop_path = float(self.get("dropout", 0.1)), float(self.get("drop_path", 0.1))
        recompute, fuse = bool(self.get("recompute", True)), bool(self.get("fuse", True))
        self.sparsity, self.fused = sparsity, {}
        for i, b in enumerate(sites):
            for name in getattr(b, "linear_names", SITES):  # families list their linears (ConvNeXt: fc1, fc2)
                lin = b.linear(name)
                d_in, d_out, dev = lin.in_features, lin.out_features, lin.weight.device
                p = 0.0 if name == "proj" else dropout  # official: no input dropout on proj
                if name == "qkv" and d_out == 3 * d_in:
                    slices = qkv_slices(d_in, ["q", "k", "v"])
                else:
                    slices = {name: slice(0, d_out)}
                deltas = {t: KernelDelta(d_in, s.stop - s.start, rank, sparsity, form, p, drop_path, recompute, device=dev)
                          for t, s in slices.items()}
                b.set_linear(name, DeltaLinear(lin, deltas, slices))
            if fuse:  # fold norm2 into fc1 and GELU into fc2 (memory only; same outputs), where safe
                self.fused[i] = fuse_mlp(b.block, "norm" if b.family == "convnext" else "norm2")
        cls = getattr(model, "cls_token", None)
        if self.get("train_cls_token", True) and cls is not None:
            cls.requires_grad_(True)

    def describe(self) -> dict:
        fused = getattr(self, "fused", {})
        return {**super().describe(), "effective_sparsity": getattr(self, "sparsity", None),
                "fused_mlp_blocks": sum(1 for v in fused.values() if v)}
