"""Classic PETL methods, part A: exact ViT-B/16 counts, method-specific structure, init and identities."""
import math

import pytest
import torch
import torch.nn.functional as F

import backbones
from bench.run import params_report
from helpers import TINY_VIT, build, compose_cfg, images, trainable, vit_b16_params

VIT_B16 = {
    "ln_tune": 38_400,
    "partial": 7_087_872,
    "vpt_deep": 921_600,  # default dataset synthetic/dsprites_loc -> VTAB dsprites_loc length 100
    "prefix": 368_640,
    "u_tuning": 359_532,
    "adaptformer": 156_768,
    "dora": 313_344,
    "vera": 24_576,
    "fourierft": 72_000,
}


def frozen(seed=0, **over):
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    return backbones.build(OmegaConf.create({**TINY_VIT, **over}), num_classes=10).eval()


# -- exact counts on ViT-B/16 (mode=params, 100 classes) -------------------------------------------
@pytest.mark.parametrize("name,count", VIT_B16.items())
def test_vit_b16_default_counts(name, count):
    rep = vit_b16_params(name)
    assert (rep["method"], rep["trainable_params"], rep["head_params"]) == (name, count, 76_900)


@pytest.mark.parametrize("name,override,count", [
    ("adaptformer", "method.layernorm=in", 175_200),
    ("partial", "method.k=2", 2 * 7_087_872),
    ("partial", "method.final_norm=true", 7_087_872 + 1_536),
    ("vpt_deep", "method.num_prompts=10", 92_160),
    ("vpt_deep", "dataset.name=vtab/sun397", 9_216 * 5),
    ("vpt_deep", "dataset.name=vtab/oxford_flowers102", 9_216),
    ("vpt_deep", "dataset.name=my/unknown_task", 9_216 * 10),  # default_prompts
    ("prefix", "method.num_prefix=10", 184_320),
    ("prefix", "method.reparam=mlp", 12 * (20 * 768 + 768 * 64 + 64 + 64 * 1536 + 1536)),  # 1,972,992
    ("u_tuning", "method.tuners=[mha]", 184_320),
    ("u_tuning", "method.tuners=[ffn]", 175_212),
    ("dora", "method.rank=4", 12 * 2 * (2 * 768 * 4 + 768)),
    ("vera", "method.targets=[q,k,v]", 12 * 3 * (256 + 768)),
    ("fourierft", "method.n_frequency=10000", 240_000),
])
def test_vit_b16_variant_counts(name, override, count):
    assert vit_b16_params(name, override)["trainable_params"] == count


def test_vpt_deep_counts_with_official_heads():
    """demo.ipynb ``tuned_params`` of the official code (prompts + head)."""
    for ds, classes, total in [("dmlab", 6, 926_214), ("eurosat", 10, 929_290), ("sun397", 397, 351_373)]:
        cfg = compose_cfg(["mode=params", "backbone=vit_b16", "method=vpt_deep", f"dataset.name=vtab/{ds}",
                           f"dataset.num_classes={classes}"])
        rep = params_report(cfg)
        assert rep["trainable_params"] + rep["head_params"] == total


def test_mlp_reparam_prefix_count_matches_the_derivation():
    assert 12 * (20 * 768 + 49_216 + 99_840) == 1_972_992 == vit_b16_params("prefix", "method.reparam=mlp")["trainable_params"]
    assert 12 * 2 * 20 * 768 == 368_640


# -- LN-Tune and Partial --------------------------------------------------------------------------------
def test_ln_tune_trains_exactly_the_layernorms():
    model, _ = build("ln_tune")
    names = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    expected = {f"blocks.{i}.norm{j}.{w}" for i in range(2) for j in (1, 2) for w in ("weight", "bias")}
    assert names == expected | {"norm.weight", "norm.bias"}
    assert trainable(model) == 5 * 2 * 32


def test_partial_trains_the_last_blocks_only():
    model, _ = build("partial")
    names = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert names and all(n.startswith("blocks.1.") for n in names)
    assert trainable(model) == sum(p.numel() for p in model.blocks[1].parameters())
    with pytest.raises(ValueError, match="method.k=3"):
        build("partial", k=3)


# -- VPT-Deep -------------------------------------------------------------------------------------------
def test_vpt_deep_inserts_then_replaces_prompts_every_layer():
    p = 3
    model, _ = build("vpt_deep", num_prompts=p)
    model.eval()  # no prompt dropout
    bound = math.sqrt(6 / (3 * 8 * 8 + 32))  # VPT's xavier bound for patch 8, dim 32
    seen = {}
    for i, b in enumerate(model.blocks):
        tokens = b.petl["tokens"][0].prompts.tokens
        assert tokens.shape == (1, p, 32) and 0 < tokens.abs().max() <= bound
        b.register_forward_hook(lambda mod, inp, out, i=i: seen.update({f"out{i}": out}))
        b.attn.register_forward_pre_hook(lambda mod, inp, i=i: seen.update({f"in{i}": inp[0]}))
    x = images(2)
    model(x)
    for i, b in enumerate(model.blocks):
        assert seen[f"out{i}"].shape[1] == 1 + p + 16  # cls + prompts + 4x4 patches, at every block
        normed_prompts = b.norm1(b.petl["tokens"][0].prompts.tokens[0])
        assert torch.allclose(seen[f"in{i}"][0, 1:1 + p], normed_prompts)  # slots 1..p hold this layer's own P_i
    assert type(model.blocks[0].petl["tokens"][0]).__name__ == "InsertPrompts"
    assert type(model.blocks[1].petl["tokens"][0]).__name__ == "ReplacePrompts"
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)


def test_vpt_deep_prompt_table_lookup_and_errors():
    import methods

    m = methods.build({"name": "vpt_deep", **dict(__import__("helpers").method_cfg("vpt_deep"))})
    for ds, n in [("vtab/cifar100", 10), ("vtab/svhn", 50), ("vtab/smallnorb_ele", 200), ("flowers102", 1),
                  ("vtab/oxford_iiit_pet", 1), ("synthetic/dsprites_loc", 100), ("nope", 10), (None, 10)]:
        m.context = {"dataset": ds}
        assert m.prompt_length() == n, ds
    with pytest.raises(ValueError, match="method.num_prompts"):
        build("vpt_deep", num_prompts=0)
    with pytest.raises(ValueError, match="global_pool=token"):
        from omegaconf import OmegaConf

        model = backbones.build(OmegaConf.create({**TINY_VIT, "global_pool": "avg"}), num_classes=10)
        methods.build(__import__("helpers").method_cfg("vpt_deep")).apply(model)


# -- Prefix and U-Tuning ----------------------------------------------------------------------------------
def test_prefix_attention_equals_gated_form_and_keeps_keys():
    model, _ = build("prefix", num_prefix=5)
    ref = frozen()
    assert set(ref.state_dict()) <= set(model.state_dict())  # backbone keys unchanged (blocks.i.attn.qkv...)
    attn = model.blocks[0].attn
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        out = attn(h)
        # gated form (He et al. 2022): (1-λ)·Attn(q,k,v) + λ·softmax(q P_kᵀ/√d) P_v, per head, then proj
        B, N, H, d = 2, 17, 2, 16
        q, k, v = attn.qkv(h).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        pk, pv = (t.reshape(5, H, d).transpose(0, 1) for t in attn.prefix())
        s_tok, s_pre = (q @ k.transpose(-2, -1)) / math.sqrt(d), (q @ pk.transpose(-2, -1)) / math.sqrt(d)
        lam = s_pre.exp().sum(-1, keepdim=True) / (s_pre.exp().sum(-1, keepdim=True) + s_tok.exp().sum(-1, keepdim=True))
        mixed = (1 - lam) * (s_tok.softmax(-1) @ v) + lam * (s_pre.softmax(-1) @ pv)
        expected = attn.proj(mixed.transpose(1, 2).reshape(B, N, H * d))
    assert out.shape == (2, 17, 32)  # output length unchanged, keys had 17 + 5
    assert (out - expected).abs().max() <= 1e-5
    with torch.no_grad():
        assert not torch.equal(model.eval()(images(2)), ref(images(2)))  # prefixes change the function at init
    pk = attn.prefix.key
    assert pk.shape == (5, 32) and 0.005 < pk.std().item() < 0.05  # N(0, 0.02²)


def test_prefix_mlp_reparam_and_bad_options():
    model, _ = build("prefix", reparam="mlp", num_prefix=4)
    pk, pv = model.blocks[0].attn.prefix()
    assert pk.shape == pv.shape == (4, 32)
    assert trainable(model) == 2 * (4 * 32 + 32 * 64 + 64 + 64 * 64 + 64)
    with pytest.raises(ValueError, match="method.reparam"):
        build("prefix", reparam="lstm")
    with pytest.raises(ValueError, match="method.tuners"):
        build("u_tuning", tuners=["conv"])


def test_u_tuning_parallel_branches():
    model, _ = build("u_tuning", num_prefix=4)
    b = model.blocks[0]
    prefix, adapter = b.petl["attn_parallel"][0], b.petl["mlp_parallel"][0]
    assert adapter.source == "normed" and torch.count_nonzero(adapter.f.up.weight) == 0
    assert adapter.f.down.out_features == 9 and adapter.f.scale == 1.0
    # the parallel prefix branch: softmax over the prefixes alone, through the frozen proj weight (no bias)
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        out = prefix(None, h)
        q = F.linear(h, b.attn.qkv.weight[:32], b.attn.qkv.bias[:32]).reshape(2, 17, 2, 16).transpose(1, 2)
        pk, pv = (t.reshape(4, 2, 16).transpose(0, 1) for t in prefix.prefix())
        o = ((q @ pk.transpose(-2, -1)) / 4.0).softmax(-1) @ pv
        expected = o.transpose(1, 2).reshape(2, 17, 32) @ b.attn.proj.weight.t()
    assert (out - expected).abs().max() <= 1e-5
    assert not any(n.startswith("blocks.0.petl.attn_parallel.0._attn") for n, _ in model.named_parameters())
    # zero prefix values and the zero up-projection: the tuners add exactly nothing
    with torch.no_grad():
        for blk in model.blocks:
            blk.petl["attn_parallel"][0].prefix.value.zero_()
        assert torch.equal(model.eval()(images(2)), frozen()(images(2)))


# -- AdaptFormer ------------------------------------------------------------------------------------------
def test_adaptformer_official_defaults():
    model, _ = build("adaptformer")
    ad = model.blocks[0].petl["mlp_parallel"][0]
    assert ad.source == "residual" and ad.f.scale == 0.1
    assert isinstance(ad.f.norm, torch.nn.Identity) and isinstance(ad.f.act, torch.nn.ReLU)
    assert ad.f.drop.p == 0.1 and torch.count_nonzero(ad.f.up.weight) == 0 and ad.f.down.out_features == 8
    model_ln, _ = build("adaptformer", layernorm="in")
    assert isinstance(model_ln.blocks[0].petl["mlp_parallel"][0].f.norm, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="method.layernorm"):
        build("adaptformer", layernorm="out")


# -- DoRA -------------------------------------------------------------------------------------------------
def test_dora_magnitude_init_merge_formula_and_detached_norm():
    model, m = build("dora")
    qkv = model.blocks[0].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    dq = qkv.deltas["q"]
    assert torch.equal(dq.m.detach(), w0[:32].norm(dim=1))  # m = row norms of W0 (over the input dim)
    assert torch.count_nonzero(dq.B) == 0 and torch.count_nonzero(dq.A) > 0
    assert trainable(model) == 2 * 2 * (2 * 32 * 8 + 32)
    # detached norm: ρ depends on m only in backward
    assert torch.autograd.grad(dq.ratio().sum(), dq.A, allow_unused=True)[0] is None
    full, _ = build("dora", detach_norm=False)
    df = full.blocks[0].attn.qkv.deltas["q"]
    with torch.no_grad():
        df.B.normal_()
    assert torch.autograd.grad(df.ratio().sum(), df.A)[0].abs().sum() > 0  # the paper's full gradient
    with torch.no_grad():
        for blk in model.blocks:
            for d in blk.attn.qkv.deltas.values():
                d.B.normal_(0, 0.1)
                d.m.mul_(1.1)
    dv = qkv.deltas["v"]
    with torch.no_grad():
        wv = w0[64:] + dv.B @ dv.A
        expected_v = dv.m.unsqueeze(1) * wv / wv.norm(dim=1, keepdim=True)
        x = images(3)
        before = model.eval()(x)
        m.merge(model)
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear)
    assert (model.blocks[0].attn.qkv.weight[64:] - expected_v).abs().max() <= 1e-6
    assert torch.equal(model.blocks[0].attn.qkv.weight[32:64], w0[32:64])  # k untouched
    with torch.no_grad():
        assert (model(x) - before).abs().max() <= 1e-5


# -- VeRA -------------------------------------------------------------------------------------------------
def test_vera_shared_frozen_projections():
    model, m = build("vera", rank=16)
    deltas = [d for b in model.blocks for d in b.attn.qkv.deltas.values()]
    assert len(deltas) == 4
    A, B = deltas[0].A, deltas[0].B
    assert A.shape == (16, 32) and B.shape == (32, 16)
    assert all(torch.equal(d.A, A) and torch.equal(d.B, B) for d in deltas)  # shared by every layer
    assert A.abs().max() <= math.sqrt(6 / 32) and B.abs().max() <= math.sqrt(6 / 16)  # kaiming-uniform, gain √2
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(".A") or n.endswith(".B") for n in names)
    assert not any(k.endswith(".A") or k.endswith(".B") for k in model.state_dict())
    assert all(torch.equal(d.lambda_d, torch.full((16,), 0.1)) and torch.count_nonzero(d.lambda_b) == 0 for d in deltas)
    assert trainable(model) == 2 * 2 * (16 + 32)
    model2, _ = build("vera", rank=16, seed=5)  # a different run seed: same projections (projection_seed)
    assert torch.equal(model2.blocks[1].attn.qkv.deltas["v"].A, A)
    d = deltas[1]
    with torch.no_grad():
        d.lambda_b.normal_()
        d.lambda_d.normal_()
        expected = torch.diag(d.lambda_b) @ B @ torch.diag(d.lambda_d) @ A
        assert (d.delta_weight() - expected).abs().max() <= 1e-5
        x = torch.randn(5, 32)
        assert (d(x) - x @ expected.t()).abs().max() <= 1e-5


# -- FourierFT --------------------------------------------------------------------------------------------
def test_fourierft_delta_is_scaled_real_ifft_with_shared_indices():
    model, m = build("fourierft", n_frequency=100)
    deltas = [d for b in model.blocks for d in b.attn.qkv.deltas.values()]
    idx = deltas[0].indices
    assert idx.shape == (2, 100) and all(torch.equal(d.indices, idx) for d in deltas)  # share_entry
    assert len({(int(r), int(c)) for r, c in idx.t()}) == 100
    assert not any("indices" in k for k in model.state_dict())
    assert trainable(model) == 4 * 100
    d = deltas[0]
    S = torch.zeros(32, 32, dtype=torch.complex64)
    S[idx[0], idx[1]] = d.spectrum.detach().to(torch.complex64)
    expected = torch.fft.ifft2(S).real * 300.0  # (in × out), applied as x @ ΔW
    assert (d.delta_in_out() - expected).abs().max() <= 1e-6
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert (d(x) - x @ expected).abs().max() <= 1e-5
        assert torch.equal(d.delta_weight(), d.delta_in_out().t())
    # randn init: not the frozen model at step 0; zeros init: exactly the frozen model
    with torch.no_grad():
        assert not torch.equal(model.eval()(images(2)), frozen()(images(2)))
        zero_model, _ = build("fourierft", n_frequency=100, init="zeros")
        assert torch.equal(zero_model.eval()(images(2)), frozen()(images(2)))


def test_fourierft_init_scale_on_vit_b_size():
    from methods.fourierft import FourierDelta, spectral_indices

    torch.manual_seed(0)
    d = FourierDelta(spectral_indices(3000, 768, 768, 2024), 768, 768, 300.0)
    expected = 300 * math.sqrt(3000 / 2) / (768 * 768)  # 0.0197
    with torch.no_grad():
        assert abs(d.delta_in_out().std().item() / expected - 1) < 0.05
    # reproducible index set from the seed
    assert torch.equal(spectral_indices(3000, 768, 768, 2024), d.indices)


# -- end to end through the runner ------------------------------------------------------------------------
def test_dora_runs_on_embedded_dsprites_through_the_runner(tmp_path):
    from bench.run import run

    overrides = ["method=dora", "train.epochs=1", "dataset.sizes.train=64", "dataset.sizes.val=16",
                 "dataset.sizes.test=64", "backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
                 f"results.dir={tmp_path}", "progress=false", "device=cpu", "method.rank=4"]
    rec = run(compose_cfg(overrides), overrides)
    assert rec["status"] == "ok" and rec["method"] == "dora" and rec["variant"] == "rank=4"
    assert rec["trainable_params"] == 2 * 2 * (2 * 32 * 4 + 32)  # depth 2, q and v, A, B and m
    assert 0.0 <= rec["top1"] <= 100.0 and rec["perf"]["steps"] >= 1
    assert (tmp_path / "runs").exists()


def test_split_learning_rates_for_fourierft_and_vera():
    model, m = build("fourierft", n_frequency=50)
    assert m.param_groups(model, 1e-3, 0.01) is None  # default: the engine's groups
    model, m = build("fourierft", n_frequency=50, coef_lr=0.3)
    own, rest = m.param_groups(model, 1e-3, 0.01)
    assert own["lr"] == 0.3 and len(own["params"]) == 4 and "lr" not in rest
    assert {id(p) for p in rest["params"]} == {id(p) for p in backbones.head_of(model).parameters()}
    model, m = build("vera", rank=8, vector_lr=1e-2)
    own, rest = m.param_groups(model, 1e-3, 0.0)
    assert own["lr"] == 1e-2 and sum(p.numel() for p in own["params"]) == trainable(model) == 2 * 2 * (8 + 32)
