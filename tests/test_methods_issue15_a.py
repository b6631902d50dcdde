"""Mona, Adapter+, PiSSA, SVFT: exact official counts on ViT-B/16 (and Swin-B for Mona), placement, init, merge."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import backbones
from bench import CONF_DIR
from bench.run import params_report
from helpers import TINY_VIT, build, compose_cfg, images, trainable, vit_b16_params

SWIN = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "backbone" / "swin_micro.yaml"))
SWIN["checkpoint"] = None  # random init (the yaml ships the fractal-pretrained weights)


def mona_module(c, bottleneck=64):
    """Official Mona by construction: LN 2C + gamma C + gammax C + project1 (64C + 64) + project2 (64C + C) +
    MonaOp (3x3, 5x5, 7x7 depth-wise with bias, 1x1 64->64 with bias)."""
    op = sum(bottleneck * k * k + bottleneck for k in (3, 5, 7)) + bottleneck * bottleneck + bottleneck
    return 4 * c + (c * bottleneck + bottleneck) + (bottleneck * c + c) + op


VIT_B16 = [
    # Mona: 2 per block, 133 C + 9,728 each (MonaOp 9,664)
    ("mona", (), 24 * mona_module(768)),
    # Adapter+: W1 768x8 + b1, W2 8x768 + b2, channel scaling 768, per block
    ("adapter_plus", (), 12 * (768 * 8 + 8 + 8 * 768 + 768 + 768)),
    ("adapter_plus", ("method.bottleneck=1",), 12 * (768 + 1 + 768 + 768 + 768)),
    ("adapter_plus", ("method.scaling=learned",), 12 * (768 * 8 + 8 + 8 * 768 + 768 + 1)),
    # PiSSA r = 8 on q, k, v, proj, fc1, fc2 (official: every block linear); LoRA's sites with targets=[q,v]
    ("pissa", (), 12 * (3 * 2 * 768 * 8 + 2 * 768 * 8 + 2 * 8 * (768 + 3072))),
    ("pissa", ("method.targets=[q,v]",), 294_912),
    # SVFT-plain on q, v: n = 768 diagonal coefficients + 1 gate per matrix; banded d: n(2d+1) - d(d+1) + 1
    ("svft", (), 24 * (768 + 1)),
    ("svft", ("method.off_diag=2",), 24 * (768 * 5 - 2 * 3 + 1)),
    ("svft", ("method.pattern=random", "method.off_diag=1"), 24 * (768 * 3 - 2 + 1)),
]


@pytest.mark.parametrize("name,over,count", VIT_B16)
def test_vit_b16_counts(name, over, count):
    rep = vit_b16_params(name, *over)
    assert (rep["method"], rep["trainable_params"], rep["head_params"]) == (name, count, 76_900)


def test_the_exact_integers():
    assert mona_module(768) == 133 * 768 + 9_728 and mona_module(64) - 133 * 64 == 9_728
    assert [c for _, o, c in VIT_B16 if not o] == [2_684_928, 165_984, 1_327_104, 18_456]


def test_mona_swin_b_count_is_the_specs_number():
    rep = params_report(compose_cfg(["mode=params", "backbone=swin_b", "method=mona", "dataset.num_classes=100"]))
    # specs/video_dense.md: Swin-B, 2 per block, sum of block widths 12,032 over 24 blocks
    assert rep["trainable_params"] == 2 * (133 * 12_032 + 24 * 9_728) == 3_667_456


# -- Mona -------------------------------------------------------------------------------------------------
def reference_mona(mod, x, grid, prefix):
    """The official forward, written out: every token-wise step on all tokens, MonaOp on the patch grid and on each
    prefix token as a 1x1 map."""
    p = F.linear(mod.norm(x) * mod.gamma + x * mod.gammax, mod.project1.weight, mod.project1.bias)

    def op(t):
        q = sum(F.conv2d(t, c.weight, c.bias, padding=c.kernel_size[0] // 2, groups=t.shape[1])
                for c in mod.adapter_conv.convs) / 3 + t
        return q + F.conv2d(q, mod.adapter_conv.projector.weight, mod.adapter_conv.projector.bias)

    B, N, C = p.shape
    h, w = grid
    patches = op(p[:, prefix:].permute(0, 2, 1).reshape(B, C, h, w)).reshape(B, C, h * w).permute(0, 2, 1)
    pre = torch.stack([op(p[:, i].reshape(B, C, 1, 1)).reshape(B, C) for i in range(prefix)], 1)
    r = torch.cat([pre, patches], 1)
    return x + F.linear(F.gelu(r), mod.project2.weight, mod.project2.bias)


def test_mona_sites_init_and_forward():
    model, _ = build("mona")
    for blk in model.blocks:
        assert len(blk.petl["mid"]) == 1 and len(blk.petl["out"]) == 1 and set(blk.petl) == {"mid", "out"}
    mod = model.blocks[0].petl["mid"][0]
    assert torch.equal(mod.gamma, torch.full((32,), 1e-6)) and torch.equal(mod.gammax, torch.ones(32))
    assert mod.project1.weight.std().item() == pytest.approx(0.02, rel=0.25) and mod.project2.bias.abs().sum() == 0
    assert mod.grid == (4, 4) and mod.prefix == 1
    assert [c.kernel_size for c in mod.adapter_conv.convs] == [(3, 3), (5, 5), (7, 7)]
    assert trainable(model) == 4 * mona_module(32)
    mod.eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, 17, 32)
        assert torch.allclose(mod(x), reference_mona(mod, x, (4, 4), 1), atol=1e-5)
    # sits after the attention residual (mid) and after the MLP residual (out): with both removed, the block is timm's
    blk = model.blocks[1]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        m1, m2 = blk.petl["mid"][0].eval(), blk.petl["out"][0].eval()
        x1 = m1(x + blk.attn(blk.norm1(x)))
        expect = m2(x1 + blk.mlp(blk.norm2(x1)))
        assert torch.allclose(blk.eval()(x), expect, atol=1e-6)


def test_mona_on_swin_uses_each_stage_grid():
    model, _ = build("mona", backbone=SWIN)
    s = backbones.sites(model)
    assert [b.block.petl["mid"][0].grid for b in s] == [(16, 16), (16, 16), (8, 8), (8, 8)]
    assert all(b.block.petl["out"][0].prefix == 0 for b in s)
    assert trainable(model) == 2 * sum(mona_module(b.dim) for b in s)
    assert model(images(2)).shape == (2, 10)


def test_mona_rejects_a_wrong_sequence_length():
    model, _ = build("mona")
    with pytest.raises(ValueError, match="1 prefix \\+ 4x4 grid tokens"):
        model.blocks[0].petl["mid"][0](torch.randn(1, 10, 32))


# -- Adapter+ ---------------------------------------------------------------------------------------------
def test_adapter_plus_post_position_scaling_and_houlsby_init():
    torch.manual_seed(0)
    model, _ = build("adapter_plus", backbone={**TINY_VIT, "embed_dim": 64, "num_heads": 2}, bottleneck=64)
    blk = model.blocks[0]
    ad = blk.petl["out"][0]
    assert set(blk.petl) == {"out"} and isinstance(ad.scaling, torch.nn.Parameter)
    assert torch.equal(ad.scaling, torch.ones(64))
    for lin in (ad.f.down, ad.f.up):
        w = lin.weight
        assert w.abs().max() <= 0.02 and 0.006 < w.std() < 0.01 and lin.bias.abs().sum() == 0
    assert isinstance(ad.f.norm, torch.nn.Identity)
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        ad.eval()
        ad.scaling.uniform_(0, 2)
        y = x + blk.attn(blk.norm1(x))
        y = y + blk.mlp(blk.norm2(y))
        expect = y + ad.f.up(F.gelu(ad.f.down(y))) * ad.scaling
        assert torch.allclose(blk.eval()(x), expect, atol=1e-6)


def test_adapter_plus_lora_init_is_identity_and_per_dataset_dims():
    from methods.adapter_plus import AdapterPlus

    from omegaconf import OmegaConf as OC
    torch.manual_seed(0)
    ref = backbones.build(OC.create(TINY_VIT), num_classes=10).eval()
    model, _ = build("adapter_plus", init="lora")
    with torch.no_grad():
        assert torch.equal(model.eval()(images(2)), ref(images(2)))
    counts = {}
    for ds in ("vtab/resisc45", "vtab/cifar100", "fgvc/cars"):
        m = AdapterPlus({"per_dataset": True})
        m.context = {"dataset": ds}
        model = backbones.build(OC.create(TINY_VIT), num_classes=10)
        m.apply(model)
        counts[ds] = model.blocks[0].petl["out"][0].f.down.out_features
    assert counts == {"vtab/resisc45": 32, "vtab/cifar100": 1, "fgvc/cars": 32}


# -- PiSSA ------------------------------------------------------------------------------------------------
def test_pissa_factors_are_the_principal_components_and_the_residual_is_frozen():
    torch.manual_seed(0)
    ref = backbones.build(OmegaConf.create(TINY_VIT), num_classes=10)
    model, _ = build("pissa", rank=4)
    w0 = ref.blocks[0].mlp.fc1.weight.detach()
    fc1 = model.blocks[0].mlp.fc1
    d = fc1.deltas["fc1"]
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    assert torch.allclose(d.B @ d.A, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    assert torch.allclose(d.A.norm(dim=1) ** 2, s[:4], atol=1e-5)  # A rows = sqrt(S_r) V_r^T
    assert not fc1.base.weight.requires_grad
    assert torch.allclose(torch.linalg.matrix_norm(fc1.base.weight, 2), s[4], atol=1e-5)  # residual: the rest
    q = model.blocks[1].attn.qkv
    assert set(q.deltas) == {"q", "k", "v"} and q.slices["k"] == slice(32, 64)
    u, s, vh = torch.linalg.svd(ref.blocks[1].attn.qkv.weight[32:64].detach(), full_matrices=False)
    assert torch.allclose(q.deltas["k"].B @ q.deltas["k"].A, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    x = images(3)
    with torch.no_grad():
        assert (model.eval()(x) - ref.eval()(x)).abs().max() < 1e-5  # same function at step 0, up to rounding


def test_pissa_fast_svd_and_alpha():
    model, _ = build("pissa", rank=4, alpha=8, svd_niter=16, targets=["q", "v"])
    ref_model, _ = build("pissa", rank=4, alpha=8, targets=["q", "v"])
    a, b = model.blocks[0].attn.qkv.deltas["v"], ref_model.blocks[0].attn.qkv.deltas["v"]
    assert a.scale == 2.0
    # randomised SVD: the leading component is found, the function is preserved by construction
    top = torch.linalg.matrix_norm
    assert top(a.scale * a.B @ a.A, 2).item() == pytest.approx(top(b.scale * b.B @ b.A, 2).item(), rel=0.02)
    x = images(2)
    with torch.no_grad():
        assert (model.eval()(x) - ref_model.eval()(x)).abs().max() < 1e-4


# -- SVFT -------------------------------------------------------------------------------------------------
def test_svft_is_the_official_reparameterisation():
    torch.manual_seed(0)
    ref = backbones.build(OmegaConf.create(TINY_VIT), num_classes=10)
    model, _ = build("svft", off_diag=1)
    q = model.blocks[0].attn.qkv
    d = q.deltas["v"]
    n = 32
    assert d.coef.numel() == n * 3 - 2 and d.gate.item() == 0.0
    rows, cols = d.index
    assert (rows - cols).abs().max() == 1 and len(set(zip(rows.tolist(), cols.tolist()))) == d.coef.numel()
    assert 0.1 < d.coef.std().item() / (2 / d.coef.numel()) ** 0.5 < 2  # kaiming_normal on (1, k)
    w0 = ref.blocks[0].attn.qkv.weight[64:96].detach()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    m = torch.zeros(n, n)
    m[rows, cols] = d.coef.detach()
    official = u @ (torch.diag(s) + 0.5 * m) @ vh  # W' = U (S + sigmoid(g) M) V^T with g = 0
    assert torch.allclose(w0 + d.delta_weight().detach(), official, atol=1e-5)
    with torch.no_grad():
        for t in ("q", "v"):
            q.deltas[t].coef.zero_()
        for blk in model.blocks[1:]:
            for t in ("q", "v"):
                blk.attn.qkv.deltas[t].coef.zero_()
        assert torch.equal(model.eval()(images(2)), ref.eval()(images(2)))  # M = 0: exactly the frozen model


def test_svft_patterns():
    from methods.svft import pattern_index

    idx = pattern_index("banded", 6, 0)
    assert idx.tolist() == [list(range(6)), list(range(6))]
    idx = pattern_index("banded", 6, 2)
    assert idx.shape[1] == 6 * 5 - 6 and (idx[0] * 6 + idx[1]).diff().min() > 0  # row-major, unique
    torch.manual_seed(0)
    assert pattern_index("random", 6, 1).shape == (2, 6 * 3 - 2)
    u, vh = torch.linalg.qr(torch.randn(6, 6))[0], torch.linalg.qr(torch.randn(6, 6))[0].t()
    top = pattern_index("top_k", 6, 0, u, vh)
    assert torch.equal((u @ vh.t())[top[0], top[1]].sort(descending=True).values,
                       (u @ vh.t()).reshape(-1).topk(6).values)
    with pytest.raises(ValueError, match="unknown pattern"):
        pattern_index("diag", 6, 0)


def test_svft_coef_lr_groups():
    model, m = build("svft", coef_lr=0.05)
    groups = m.param_groups(model, 4e-3, 0.01)
    assert groups[0]["lr"] == 0.05 and len(groups[0]["params"]) == 2 * 2 * 2  # coef + gate, q and v, 2 blocks
    assert "lr" not in groups[1]
