"""Side networks (LST, HST, LAST) and SNF: counts, gradient isolation, shapes, init, state-dict keys."""
import pytest
import torch
from omegaconf import OmegaConf

import backbones
from helpers import TINY_VIT, build, images, trainable, vit_b16_params


def plain(seed=0, cfg=TINY_VIT, num_classes=10):
    torch.manual_seed(seed)
    return backbones.build(OmegaConf.create(cfg), num_classes=num_classes)


@pytest.mark.parametrize("name,extra,expected,head", [
    ("hst", (), 764_840, 7_300),
    ("lst", (), 2_376_492, 76_900),
    ("last", (), 618_048, 76_900),
    ("snf", ("method.flows=0",), 36_864, 76_900),
    ("snf", ("method.flows=6",), 258_192, 76_900),
    ("snf", ("method.flows=16",), 627_072, 76_900),
])
def test_counts_vit_b16(name, extra, expected, head):
    r = vit_b16_params(name, *extra)
    assert r["trainable_params"] == expected
    assert r["head_params"] == head


@pytest.mark.parametrize("name", ["lst", "last", "hst"])
def test_side_keeps_backbone_keys_and_head(name):
    model, _ = build(name)
    ref = plain()
    keys, ref_keys = set(model.state_dict()), set(ref.state_dict())
    assert ref_keys <= keys
    assert all(k.startswith("petl_side.") for k in keys - ref_keys)
    assert backbones.head_of(model) is model.head
    assert all(p.requires_grad for p in model.head.parameters())
    out = model(images(2))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["lst", "last"])
def test_side_backbone_builds_no_graph(name):
    """The frozen backbone runs under no_grad: its block outputs carry no graph, it gets no gradient,
    and the side net still trains."""
    model, _ = build(name)
    model.train()
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)) for b in model.blocks]
    loss = torch.nn.functional.cross_entropy(model(images(4)), torch.arange(4))
    for h in hooks:
        h.remove()
    assert seen == [False, False]
    loss.backward()
    side = dict(model.petl_side.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in side.values())
    backbone = [n for n, p in model.named_parameters() if not n.startswith(("petl_side.", "head."))]
    assert all(dict(model.named_parameters())[n].grad is None for n in backbone)


def test_lst_structure_and_gates():
    model, _ = build("lst", backbone={**TINY_VIT, "embed_dim": 64, "num_heads": 8})
    side = model.petl_side
    assert side.first_down.out_features == 8 and len(side.blocks) == 2  # 64 / reduction 8
    assert side.blocks[0].attn.num_heads == 8 and side.blocks[0].attn.head_dim == 1
    assert torch.equal(torch.sigmoid(side.gates / side.temperature), torch.full((2,), 0.5))
    assert side.up.out_features == 64
    # not function-preserving at init
    with torch.no_grad():
        assert not torch.allclose(model.eval()(images(2)), plain(cfg={**TINY_VIT, "embed_dim": 64, "num_heads": 8}).eval()(images(2)))
    with pytest.raises(ValueError, match="method.reduction"):
        build("lst", reduction=5)


def test_lst_vit_b16_side_shape():
    from bench.run import build_model
    from helpers import compose_cfg

    model, _ = build_model(compose_cfg(["backbone=vit_b16", "method=lst", "dataset.num_classes=100"]), device="meta")
    blk = model.petl_side.blocks[0]
    assert model.petl_side.first_down.out_features == 96
    assert blk.attn.num_heads == 12 and blk.attn.head_dim == 8 and blk.mlp.fc1.out_features == 384


def test_last_identity_at_init_then_moves():
    model, m = build("last")
    ref = plain().eval()
    model.eval()
    x = images(3)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    torch.nn.functional.cross_entropy(model(images(8, seed=1)), torch.arange(8)).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), ref(x))
    # tiny ViT: 2 blocks × (LN 64 + 3·(32·16 + 16) + (16·32 + 32))
    assert trainable(model) == 2 * (64 + 3 * (32 * 16 + 16) + (16 * 32 + 32))


def test_last_bias_correction_form():
    """u_m − Σ_{i<m} z_i computed literally equals the returned representation."""
    model, _ = build("last")
    side = model.petl_side
    torch.manual_seed(0)
    for blk in side.blocks:
        torch.nn.init.normal_(blk.o.weight, std=0.1)
    from methods.blocks.side import trunk

    z0, outs = trunk(model, images(2))
    u = z0
    for z, lsa in zip(outs, side.blocks):
        x = u + z
        u = x + lsa(x)
    literal = u - (z0 + sum(outs[:-1]))
    assert torch.allclose(side(z0, outs), literal, atol=1e-5)
    with pytest.raises(ValueError, match="method.gap"):
        build("last", gap=3)


HST_VIT = {**TINY_VIT, "img_size": 224, "patch_size": 16, "embed_dim": 24, "depth": 12, "num_heads": 2}


def test_hst_shapes_meta_tokens_and_norms():
    model, _ = build("hst", backbone=HST_VIT)
    side = model.petl_side
    grids, feats, vit_lens = [], {}, []
    hooks = [s.register_forward_hook(lambda m, i, o: grids.append((o[1], o[2]))) for s in side.stems]
    hooks.append(side.fc_norm.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o.shape)))
    hooks += [b.register_forward_pre_hook(lambda m, i: vit_lens.append(i[0].shape[1])) for b in model.blocks]
    model.train()
    out = model(images(2, size=224))
    for h in hooks:
        h.remove()
    assert grids == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert feats["f"] == (2, 72) and out.shape == (2, 10)
    assert vit_lens == [1 + 1 + 196] * 12  # meta token in front of CLS at every layer, dropped after
    assert [b.attn.num_heads for b in side.blocks[::3]] == [2, 4, 8, 12]
    assert side.layer_of == list(range(12))
    assert side.meta.abs().max() <= (3 / 24) ** 0.5 and side.meta.shape == (12, 1, 24)  # ±√(3/d): 0.0625 at d=768
    assert abs((3 / 768) ** 0.5 - 0.0625) < 1e-12
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"blocks.{i}.norm{k}.{w}" for i in range(12) for k in (1, 2) for w in ("weight", "bias")} <= trained
    assert not any(n.startswith("blocks.") and "norm" not in n for n in trained)
    assert model.head.in_features == 72


def test_hst_vit_norms_option_and_not_identity():
    with_norms, _ = build("hst")
    without, _ = build("hst", train_vit_norms=False)
    assert trainable(with_norms) - trainable(without) == 2 * 2 * 2 * 32  # 2 blocks × 2 LNs × (w, b) × 32


def test_snf_identity_and_init():
    model, _ = build("snf")  # flows 0: exact identity
    ref = plain().eval()
    x = images(3)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))
    f = model.blocks[0].petl["attn_parallel"][0]
    assert torch.equal(f.mu, torch.zeros(32)) and torch.equal(f.log_scale, torch.zeros(32))
    assert f.w is None  # no empty tensors at K=0


def test_snf_planar_flows_small_deviation_and_formula():
    model, _ = build("snf", flows=6)
    f = model.blocks[0].petl["mlp_parallel"][0]
    assert f.w.shape == (6, 32) and f.u.shape == (6, 32) and f.b.shape == (6,)
    assert max(p.abs().max() for p in (f.w, f.u, f.b)) <= 0.01
    # NF(x) − x equals the flow written out
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        f.mu.normal_(0, 0.1)
        f.log_scale.normal_(0, 0.1)
        z = f.mu + torch.exp(f.log_scale) * x
        for k in range(6):
            z = z + f.u[k] * torch.tanh(z @ f.w[k] + f.b[k]).unsqueeze(-1)
        assert torch.allclose(f(x, None), z - x, atol=1e-6)
    # at init, per-block relative deviation from the frozen block is within ~1%
    model, _ = build("snf", flows=6)
    ref = plain()
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        for b, rb in zip(model.eval().blocks, ref.eval().blocks):
            dev = (b(h) - rb(h)).norm() / rb(h).norm()
            assert 0 < dev < 0.01
    with pytest.raises(ValueError, match="method.flows"):
        build("snf", flows=-1)
