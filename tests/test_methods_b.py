"""Classic PETL methods, part B: exact counts on ViT-B/16 and each method's own behaviour."""
import math

import pytest
import torch
from omegaconf import OmegaConf

import backbones
from helpers import TINY_VIT, build, compose_cfg, images, trainable, vit_b16_params

VIT_B16 = [
    ("ssf", (), 205_824),
    ("fact_tt", (), 21_504),                       # 1536 r + 144 r^2, r = 8
    ("fact_tt", ("method.rank=16",), 1536 * 16 + 144 * 16 ** 2),
    ("fact_tk", (), 86_528),                       # 1536 r + r^3 + 144 r, r = 32
    ("fact_tk", ("method.rank=16",), 30_976),
    ("repadapter", (), 239_808),
    ("convpass", (), 327_552),
    ("convpass", ("method.variant=attn",), 163_776),
    ("hydra_adapter", (), 239_712),
    ("dtl", (), 36_864),
    ("dtl", ("method.fusion_size=3",), 36_864 + 768 * 9),
]


@pytest.mark.parametrize("name,over,count", VIT_B16)
def test_vit_b16_trainable_counts(name, over, count):
    rep = vit_b16_params(name, *over)
    assert rep["trainable_params"] == count
    assert rep["head_params"] == 76_900


def noah_count(sub, dim=768):
    """NOAH retrain parameters by hand: prompts p·dim, LoRA (A r×dim + B 3dim×r), adapter 2·dim·a + a + dim."""
    prompts = sum(sub["prompt"]) * dim
    lora = sum(4 * dim * r for r in sub["lora"])
    adapter = sum(2 * dim * a + a + dim for a in sub["adapter"] if a > 0)
    return prompts + lora + adapter


def test_noah_cifar100_subnet_count_by_hand():
    cifar100 = {"prompt": [10, 5, 10, 1, 5, 1, 10, 1, 10, 5, 1, 10],
                "lora": [10, 1, 5, 5, 1, 10, 1, 1, 1, 10, 1, 1],
                "adapter": [5, 10, 10, 10, 5, 1, 1, 1, 10, 10, 10, 1]}
    # 69 prompts * 768 + 47 * 3072 + (74 * 1537 + 12 * 768)
    assert noah_count(cifar100) == 52_992 + 144_384 + 122_954 == 320_330
    assert vit_b16_params("noah", "method.subnet=cifar100")["trainable_params"] == 320_330


def test_noah_auto_picks_the_dataset_subnet():
    from methods.noah import load_subnet

    # the default dataset is synthetic/dsprites_loc -> NOAH's dsprites_loc subnet
    assert vit_b16_params("noah")["trainable_params"] == noah_count(load_subnet("dsprites_loc")) == 334_914
    model, m = build("noah")  # no run context -> cifar100, first 2 layers on the 2-block ViT
    assert m.subnet["name"] == "cifar100" and m.subnet["prompt"] == [10, 5]
    m2 = type(m)({"subnet": "auto"})
    m2.context = {"dataset": "vtab/oxford_iiit_pet"}
    assert m2.choose_subnet()[0] == "oxford_iiit_pet"
    m3 = type(m)({"subnet": "auto"})
    m3.context = {"dataset": "fgvc/cub"}
    with pytest.raises(ValueError, match="no published subnet for dataset 'cub'"):
        m3.choose_subnet()
    with pytest.raises(ValueError, match="method.subnet='nope'"):
        build("noah", subnet="nope")


def test_noah_sequence_lora_and_adapter_on_tiny_vit():
    model, m = build("noah")
    # cifar100 subnet, first two blocks: prompts 10, 5; LoRA 10, 1; adapter 5, 10
    assert trainable(model) == (10 + 5) * 32 + (10 + 1) * 4 * 32 + (2 * 32 * 5 + 5 + 32) + (2 * 32 * 10 + 10 + 32)
    seen = []
    for blk in model.blocks:
        blk.attn.register_forward_hook(lambda mod, i, o: seen.append(o.shape[1]))
    model.eval()
    model(images(2))
    assert seen == [17 + 10, 17 + 5]  # prompts appended at the end, previous block's replaced
    lr = model.blocks[0].attn.qkv.deltas["lora"]
    assert lr.B.shape == (96, 10) and torch.count_nonzero(lr.B) == 0 and lr.scale == 1.0
    model2, _ = build("noah", prompt=[0, 3], lora=[0, 2], adapter=[4, 0])
    assert trainable(model2) == 3 * 32 + 2 * 4 * 32 + (2 * 32 * 4 + 4 + 32)


def test_ssf_identity_option_and_official_init():
    ref = build("linear")[0].eval()
    model, _ = build("ssf", init="identity")
    x = images(3)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))
    model, _ = build("ssf")
    ss = model.blocks[0].attn.qkv.ss
    assert ss.scale.shape == (96,) and 0.005 < (ss.scale - 1).std() < 0.04 and 0.005 < ss.shift.std() < 0.04
    with torch.no_grad():
        assert not torch.equal(model.eval()(x), ref(x))


def test_ssf_merge_restores_plain_modules():
    model, m = build("ssf")
    x = images(2)
    with torch.no_grad():
        before = model.eval()(x)
        m.merge(model)
        after = model(x)
    assert (before - after).abs().max() <= 1e-5
    assert type(model.patch_embed.proj) is torch.nn.Conv2d and isinstance(model.norm, torch.nn.LayerNorm)
    assert isinstance(model.blocks[1].norm1, torch.nn.LayerNorm) and type(model.blocks[1].mlp.fc1) is torch.nn.Linear


@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_fact_delta_weight_matches_forward(name):
    model, m = build(name, rank=4, scale=0.7)
    [shared] = model.petl_fact.values()  # one width on ViT: one shared pair
    assert torch.count_nonzero(shared.V) == 0 and torch.count_nonzero(shared.U) > 0
    with torch.no_grad():
        shared.V.normal_()
    model.eval()
    x = torch.randn(2, 5, 32)
    h = torch.randn(2, 5, 64)
    for site, inp in (("qkv", x), ("proj", x), ("fc1", x), ("fc2", h)):
        lin = getattr(model.blocks[1].attn if site in ("qkv", "proj") else model.blocks[1].mlp, site)
        d = lin.deltas["fact"]
        with torch.no_grad():
            assert torch.allclose(d(inp), inp @ d.delta_weight().t(), atol=1e-5), site
    if name == "fact_tk":
        # 12 core columns per ViT-B block; the tiny ViT (MLP ratio 2) has 4 + 2*2 = 8
        assert shared.C.shape == (4, 4, 4) and shared.P.shape == (4, 2 * 8)


def test_fact_per_dataset_values():
    from methods.fact import FacTTK

    m = FacTTK({"rank": 32, "scale": 1.0, "per_dataset": True})
    m.context = {"dataset": "vtab/dtd"}
    from methods.blocks.dataset_params import resolved_cfg

    assert resolved_cfg(m)["rank"] == 16 and resolved_cfg(m)["scale"] == 0.01
    m.context = {"dataset": "synthetic/unknown"}
    with pytest.raises(ValueError, match="no official fact_tk values for dataset 'unknown'"):
        resolved_cfg(m)


def test_repadapter_grouped_up_projection_and_weights_only_count():
    model, _ = build("repadapter")
    f = model.blocks[0].attn.qkv.f
    with torch.no_grad():
        f.up_weight.normal_()
    u = f.up_dense()
    assert u.shape == (32, 8)
    assert torch.count_nonzero(u[:16, 4:]) == 0 and torch.count_nonzero(u[16:, :4]) == 0  # block-diagonal, 2 groups
    # the grouped forward equals the dense one
    z = torch.randn(3, 8)
    assert torch.allclose(f.up(z), z @ u.t() + f.up_bias, atol=1e-6)
    rep = OmegaConf.create(TINY_VIT | {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
                                       "img_size": 224, "patch_size": 16, "name": "vit_b16"})
    big = backbones.build(rep, num_classes=100, device="meta")
    import methods

    methods.build(OmegaConf.create({"name": "repadapter"})).apply(big)
    weights = sum(p.numel() for n, p in big.named_parameters() if p.requires_grad and p.dim() >= 2 and "head" not in n)
    assert weights == 221_184


def test_hydra_merge_folds_into_proj_and_fc2():
    model, m = build("hydra_adapter")
    with torch.no_grad():
        for b in model.blocks:
            for lin in (b.attn.proj, b.mlp.fc2):
                for br in (lin.par, lin.seq):
                    br.up_weight.normal_(0, 0.1)
                    br.up_bias.normal_(0, 0.1)
    x = images(2)
    model.eval()
    with torch.no_grad():
        before = model(x)
        m.merge(model)
        assert (model(x) - before).abs().max() <= 1e-5
    assert type(model.blocks[0].attn.proj) is torch.nn.Linear and type(model.blocks[0].mlp.fc2) is torch.nn.Linear
    assert model.blocks[0].mlp.fc2.in_features == 64


def test_convpass_init_grid_and_scale():
    model, _ = build("convpass")
    c = model.blocks[0].petl["attn_parallel"][0]
    w = c.conv.weight
    assert torch.equal(w[:, :, 1, 1], torch.eye(8)) and w.abs().sum() == 8  # centre tap identity
    assert c.grid == (4, 4) and torch.count_nonzero(c.up.weight) == 0
    model, _ = build("convpass", xavier_init=True, scale=3.0)
    c = model.blocks[1].petl["mlp_parallel"][0]
    assert torch.count_nonzero(c.conv.weight[:, :, 0, 0]) > 0 and c.scale == 3.0
    with torch.no_grad():
        c.up.weight.normal_()
    h = torch.randn(2, 17, 32)
    c.eval()
    with torch.no_grad():
        out = c(h, h)
    assert out.shape == (2, 17, 32)
    # the class token sees only the centre tap and the bias: equal to a per-token map
    z = torch.nn.functional.linear(h[:, :1], c.down.weight, c.down.bias)
    z = z * torch.sigmoid(1.702 * z)
    z = torch.nn.functional.linear(z, c.conv.weight[:, :, 1, 1], c.conv.bias)
    z = z * torch.sigmoid(1.702 * z)
    assert torch.allclose(out[:, :1], c.up(z) * 3.0, atol=1e-5)


def test_dtl_pooling_side_stream_and_identity_with_same_head():
    from methods.dtl import use_gap_then_norm

    model, m = build("dtl")
    assert model.global_pool == "avg" and isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert isinstance(model.norm, torch.nn.Identity)
    torch.manual_seed(0)
    ref = backbones.build(OmegaConf.create(TINY_VIT), num_classes=10)
    use_gap_then_norm(ref)
    x = images(3)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref.eval()(x))  # B = 0: the side stream adds swish(0) = 0
    # depth 2: collects before blocks 0, 1 and adds after block 1 (the second half)
    assert "tokens" in model.blocks[0].petl and "tokens" in model.blocks[1].petl
    assert model.blocks[1].petl["out"][0].add and not any("out" in b.petl and b.petl["out"][0].add
                                                           for b in model.blocks[:1])
    with torch.no_grad():
        for b in model.blocks:
            b.petl["tokens"][0].lowrank.B.normal_()
        y = model(x)
    assert not torch.equal(y, ref(x))
    assert model.blocks[0].petl["tokens"][0]._state.R is None  # no graph kept between forwards
    with pytest.raises(ValueError, match="add_after_blocks"):
        build("dtl", add_after_blocks="6-11")


def test_dtl_swish_beta():
    from methods.dtl import DTLAdd, _SideState

    st = _SideState()
    R = torch.tensor([[[-1.0, 0.0, 0.01, 2.0]]])
    st.R = R
    out = DTLAdd(st, beta=100.0, add=True, clear=True, prefix=0)(torch.zeros(1, 1, 4))
    assert torch.allclose(out, R * torch.sigmoid(100 * R))
    assert out[0, 0, 3] == 2.0 and abs(out[0, 0, 0]) < 1e-40 and st.R is None


def test_end_to_end_ssf_through_the_runner(tmp_path):
    from bench.run import run

    overrides = ["method=ssf", "train.epochs=1", "dataset.sizes.train=64", "dataset.sizes.val=16",
                 "dataset.sizes.test=64", "backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
                 f"results.dir={tmp_path}", "progress=false", f"cache_dir={tmp_path / 'cache'}"]
    rec = run(compose_cfg(overrides), overrides)
    # patch conv 32 + per block (qkv 96 + proj 32 + fc1 128 + fc2 32 + 2 norms 64) + final norm 32, x2 (scale, shift)
    assert rec["trainable_params"] == 2 * (32 + 2 * (96 + 32 + 128 + 32 + 64) + 32)
    assert rec["method"] == "ssf" and 0.0 <= rec["top1"] <= 100.0 and rec["perf"]["steps"] >= 1
    assert (tmp_path / "runs").exists()


@pytest.mark.parametrize("name,dataset,attr,expected", [
    ("convpass", "vtab/dsprites_loc", lambda m: (m.blocks[0].petl["attn_parallel"][0].scale,
                                                 bool(m.blocks[0].petl["attn_parallel"][0].conv.weight[0, 0, 0, 0] != 0)),
     (100.0, True)),
    ("repadapter", "vtab/svhn", lambda m: m.blocks[0].attn.qkv.f.scale, 10.0),
    ("hydra_adapter", "vtab/cifar100", lambda m: (m.blocks[0].attn.proj.par.scale,
                                                  m.blocks[0].attn.proj.par.drop.p), (0.1, 0.2)),
    ("fact_tt", "vtab/clevr_dist", lambda m: (next(iter(m.petl_fact.values())).rank, m.blocks[0].attn.qkv.deltas["fact"].scale), (4, 10.0)),
])
def test_per_dataset_official_values_reach_the_modules(name, dataset, attr, expected):
    import methods
    from helpers import method_cfg

    torch.manual_seed(0)
    model = backbones.build(OmegaConf.create(TINY_VIT), num_classes=10)
    m = methods.build(method_cfg(name, per_dataset=True))
    m.context = {"dataset": dataset}
    m.apply(model)
    assert attr(model) == expected
