"""SNELL's fused MLP branches (methods.blocks.fused_mlp): what autograd saves, exactness, merge, fallbacks."""
import pytest
import torch
from omegaconf import OmegaConf

import backbones
import methods
from helpers import TINY_VIT, build, images, method_cfg
from methods.blocks.fused_mlp import Deferred, PreDeltaLinear, fuse_mlp
from methods.blocks.dropout import p_effective
from methods.blocks.kernel_lora import KernelDeltaFn, _dropout_keep, kernel_delta, sparse_delta

B, N, DIM, HIDDEN, DEPTH = 4, 17, 32, 64, 2  # tiny ViT: 16 patches + cls, mlp ratio 2
SNELL = dict(rank=8, sparsity=0.5)


def saved_activation_bytes(model, x):
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_fused_saves_neither_gelu_nor_norm2_output():
    x = images(B)
    sizes = {}
    for key, (name, over) in {"fused": ("snell", SNELL), "unfused": ("snell", {**SNELL, "fuse": False}),
                              "lora": ("lora", {})}.items():
        model, _ = build(name, **over)
        sizes[key] = saved_activation_bytes(model.train(), x)
    # exactly one hidden-wide tensor (GELU's output), one dim-wide tensor (norm2's output) and norm2's
    # per-token mean and rstd (recomputed in backward) per block less
    assert sizes["unfused"] - sizes["fused"] == DEPTH * B * N * (HIDDEN + DIM + 2) * 4
    # vs LoRA (q, v, r 8): SNELL also keeps proj's input (dim-wide per block) and DropPath masks; LoRA keeps
    # its r-wide intermediates. Measured here: 178,080 vs 177,344 bytes.
    assert sizes["fused"] <= sizes["lora"] + DEPTH * B * N * DIM * 4 + 1024
    assert sizes["unfused"] > sizes["lora"] + DEPTH * B * N * HIDDEN * 4  # the check above is meaningful


def _run(fuse, train):
    model, m = build("snell", **SNELL, fuse=fuse)
    model.train(train)
    torch.manual_seed(123)  # same dropout / DropPath draws in both forms
    out = model(images(B))
    torch.nn.functional.cross_entropy(out, torch.arange(B)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, m, model


@pytest.mark.parametrize("train", [True, False])
def test_fused_equals_unfused_outputs_and_every_gradient(train):
    fo, fg, fm, fmodel = _run(True, train)
    uo, ug, um, _ = _run(False, train)
    assert fm.fused == {0: ("fc1", "fc2"), 1: ("fc1", "fc2")} and um.fused == {}
    assert fm.describe()["fused_mlp_blocks"] == DEPTH and um.describe()["fused_mlp_blocks"] == 0
    assert isinstance(fmodel.blocks[0].norm2, Deferred) and isinstance(fmodel.blocks[1].mlp.fc2, PreDeltaLinear)
    assert torch.equal(fo, uo)  # same ops on the same values in forward
    assert set(fg) == set(ug) and len(fg) == 2 * DEPTH * 6 + 3  # A, B × 6 linears × depth + cls, head w/b
    worst = max((fg[n] - ug[n]).abs().max().item() for n in fg)
    assert worst <= 1e-6, worst  # only the summation order of the two LayerNorm/GELU backwards differs
    assert all(fg[n].abs().sum() > 0 for n in fg)


def _family_cfg(family):
    from pathlib import Path

    from bench import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "backbone" / f"{family}_micro.yaml"))


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_fused_on_swin_and_convnext(family):
    cfg = _family_cfg(family)
    res = {}
    for fuse in (True, False):
        model, m = build("snell", backbone=cfg, **SNELL, fuse=fuse)
        model.train()
        torch.manual_seed(5)
        x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"], generator=torch.Generator().manual_seed(0))
        out = model(x)
        out.sum().backward()
        res[fuse] = (out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, m.fused)
    (fo, fg, fused), (uo, ug, _) = res[True], res[False]
    assert fused and all(v == ("fc1", "fc2") for v in fused.values())  # timm Mlp + GELU + LayerNorm on both
    assert torch.equal(fo, uo)
    assert max((fg[n] - ug[n]).abs().max().item() for n in fg) <= 1e-6
    assert all(g is not None and g.abs().sum() > 0 for g in fg.values())


def test_state_dict_keys_unchanged_and_merge_restores_plain_modules():
    model, m = build("snell", **SNELL)
    plain, _ = build("snell", **SNELL, fuse=False)
    assert set(model.state_dict()) == set(plain.state_dict())  # stand-ins keep the LayerNorm keys
    blk = model.blocks[0]
    ln_w = blk.norm2.weight
    model.eval()
    x = images(3, seed=7)
    with torch.no_grad():
        before = model(x)
        m.merge(model)
        after = model(x)
    assert (before - after).abs().max().item() <= 1e-5
    assert type(blk.norm2) is type(_bare().blocks[0].norm2) and blk.norm2.weight is ln_w
    assert type(blk.mlp.act) is torch.nn.GELU
    assert type(blk.mlp.fc1) is torch.nn.Linear and type(blk.mlp.fc2) is torch.nn.Linear


def _bare():
    torch.manual_seed(0)
    return backbones.build(OmegaConf.create(TINY_VIT), num_classes=10)


def test_falls_back_where_fusing_is_not_safe():
    # an MLP dropout between GELU and fc2: fc2 stays unfused (fc1 still fused)
    model = _bare()
    model.blocks[0].mlp.drop1 = torch.nn.Dropout(0.1)
    m = methods.build(method_cfg("snell", **SNELL))
    m.apply(model)
    assert m.fused[0] == ("fc1",) and m.fused[1] == ("fc1", "fc2")
    assert type(model.blocks[0].mlp.fc2).__name__ == "DeltaLinear" and type(model.blocks[0].mlp.act) is torch.nn.GELU
    # an activation we do not know: fc2 unfused; a trainable norm2: fc1 unfused
    model = _bare()
    model.blocks[1].mlp.act = torch.nn.SiLU()
    m = methods.build(method_cfg("snell", **SNELL))
    m.apply(model)
    assert m.fused[1] == ("fc1",)
    blk = _bare().blocks[0]
    for p in blk.parameters():
        p.requires_grad_(False)
    from methods.blocks.kernel_lora import KernelDelta
    from methods.blocks.lora import DeltaLinear

    for name in ("fc1", "fc2"):
        lin = getattr(blk.mlp, name)
        setattr(blk.mlp, name, DeltaLinear(lin, {name: KernelDelta(lin.in_features, lin.out_features, 4)},
                                           {name: slice(0, lin.out_features)}))
    blk.norm2.weight.requires_grad_(True)
    assert fuse_mlp(blk, "norm2") == ("fc2",)
    # an mlp_* extension receives norm2's output: the norm must stay where it is
    blk2 = _bare().blocks[1]
    for p in blk2.parameters():
        p.requires_grad_(False)
    for name in ("fc1", "fc2"):
        lin = getattr(blk2.mlp, name)
        setattr(blk2.mlp, name, DeltaLinear(lin, {name: KernelDelta(lin.in_features, lin.out_features, 4)},
                                            {name: slice(0, lin.out_features)}))
    from backbones.blocks import add_extension

    add_extension(blk2, "mlp_parallel", torch.nn.Identity())
    assert fuse_mlp(blk2, "norm2") == ("fc2",)
    assert isinstance(blk2.norm2, torch.nn.LayerNorm)


@pytest.mark.parametrize("block", [1 << 19, 50])  # one block of ΔW rows / 2 rows per block (8 blocks)
@pytest.mark.parametrize("pre", [None, "layer_norm", "gelu", "gelu_tanh"])
def test_kernel_fn_with_pre_matches_autograd_reference(pre, block, monkeypatch):
    from methods.blocks import kernel_lora

    monkeypatch.setattr(kernel_lora, "_BLOCK_ELEMS", block)
    torch.manual_seed(3)
    x = torch.randn(3, 5, 16, dtype=torch.double, requires_grad=True)
    A = torch.randn(2, 16, 4, dtype=torch.double, requires_grad=True)
    Bf = torch.randn(2, 24, 4, dtype=torch.double, requires_grad=True)
    g = torch.randn(3, 5, 24, dtype=torch.double)
    w, b = torch.randn(16, dtype=torch.double), torch.randn(16, dtype=torch.double)
    fns = {"layer_norm": lambda t: torch.nn.functional.layer_norm(t, (16,), w, b, 1e-6),
           "gelu": torch.nn.functional.gelu,
           "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"), None: None}
    fn = fns[pre]
    for s, p, form in ((0.0, 0.0, "code"), (0.6, 0.3, "code"), (0.6, 0.3, "paper")):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = KernelDeltaFn.apply(x, A, Bf, s, form, p, 99, fn)
        assert {t.data_ptr() for t in saved} == {x.data_ptr(), A.data_ptr(), Bf.data_ptr()}  # not pre(x)
        gx, ga, gb = torch.autograd.grad(y, (x, A, Bf), g)
        h = fn(x) if fn is not None else x
        hd = h * _dropout_keep(h, p, 99).double() / (1 - p_effective(p)) if p else h
        ref = hd @ sparse_delta(kernel_delta(A, Bf), s, form)
        rx, ra, rb = torch.autograd.grad(ref, (x, A, Bf), g)
        assert torch.allclose(y, ref) and torch.allclose(gx, rx) and torch.allclose(ga, ra) and torch.allclose(gb, rb)
