"""Swin and ConvNeXt families: bit-identical to timm without extensions, the Sites view (per-block widths,
missing sites named with method and family), extension points, and the foundation methods on tiny
Swin/ConvNeXt (exact counts, frozen tensors bit-identical after a step, gradients, identity, merge)."""
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer

import backbones
from backbones.sites import MethodNotDefinedError
from bench import CONF_DIR
from helpers import build, images, trainable, vit_b16_params

SWIN = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "backbone" / "swin_micro.yaml"))
SWIN["checkpoint"] = None  # random init (the yaml ships the fractal-pretrained weights)
CONVNEXT = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "backbone" / "convnext_micro.yaml"))
TINY = {"swin": SWIN, "convnext": CONVNEXT}


def plain_timm(family, seed=0):
    torch.manual_seed(seed)
    if family == "swin":
        return SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                               mlp_ratio=2.0, num_classes=10, drop_path_rate=0.0)
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)


def ours(family, seed=0, **over):
    torch.manual_seed(seed)
    return backbones.build(OmegaConf.create({**TINY[family], **over}), num_classes=10)


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_bit_identical_to_timm_without_extensions(family):
    ref, model = plain_timm(family).eval(), ours(family).eval()
    assert list(ref.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    x = images(2)
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))


def test_sites_per_block():
    s = backbones.sites(ours("swin"))
    assert s.family == "swin" and len(s) == 4 and s.embed_dim == 16 and s.num_prefix_tokens == 0
    assert [b.dim for b in s] == [16, 16, 32, 32] and [b.num_heads for b in s] == [1, 1, 2, 2]
    assert [b.prefix for b in s] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
    b = s.blocks[3]
    assert b.linear("qkv").out_features == 96 and b.linear("fc1").out_features == 64
    assert b.linear_path("proj") == "layers.1.blocks.1.attn.proj" and b.norm1 is b.block.norm1
    assert s.final_norm is s.model.norm and s.patch_embed is s.model.patch_embed

    c = backbones.sites(ours("convnext"))
    assert c.family == "convnext" and len(c) == 4 and c.embed_dim == 8
    assert [b.dim for b in c] == [8, 16, 24, 32] and [b.prefix for b in c][-1] == "stages.3.blocks.0"
    b = c.blocks[2]
    assert set(b.linears()) == {"fc1", "fc2"} and b.linear("fc2").in_features == 96
    assert b.norm2 is b.block.norm and c.final_norm is c.model.head.norm and c.patch_embed is c.model.stem


def test_missing_sites_name_method_and_family():
    c = backbones.sites(ours("convnext")).require("my_method", ("convnext",))
    b = c.blocks[0]
    for get in (lambda: b.linear("qkv"), lambda: b.set_linear("proj", torch.nn.Identity()), lambda: b.norm1,
                lambda: b.num_heads, lambda: b.extend("attn_after", torch.nn.Identity()),
                lambda: b.extend("tokens", torch.nn.Identity())):
        with pytest.raises(MethodNotDefinedError, match="method 'my_method' needs .* family 'convnext'"):
            get()
    s = backbones.sites(ours("swin")).require("prompts", ("swin",))
    with pytest.raises(MethodNotDefinedError, match="method 'prompts' needs the block extension point 'tokens'.*'swin'"):
        s.blocks[0].extend("tokens", torch.nn.Identity())
    for method, family in (("lora", "convnext"), ("vpt_shallow", "swin"), ("vpt_shallow", "convnext")):
        with pytest.raises(MethodNotDefinedError, match=f"method '{method}' is not defined for backbone family '{family}'"):
            build(method, backbone=TINY[family])


class Probe(torch.nn.Module):
    """Records input shapes; returns its input (or a zero delta for parallel points)."""

    def __init__(self, seen, key):
        super().__init__()
        self.seen, self.key = seen, key

    def forward(self, x, h=None):
        self.seen.setdefault(self.key, []).append(tuple(x.shape))
        return x if h is None else torch.zeros_like(x)


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_extension_points_see_channels_last_and_keep_identity(family):
    ref, model = ours(family).eval(), ours(family).eval()
    seen = {}
    for b in backbones.sites(model):
        for key in b.extension_keys:
            b.extend(key, Probe(seen, key))
    x = images(2)
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))
    if family == "swin":  # every point sees the block's tokens as (B, H*W, C)
        assert len(seen) == 9 and all(v == [(2, 256, 16), (2, 256, 16), (2, 64, 32), (2, 64, 32)] for v in seen.values())
    else:  # channels-last maps (B, H, W, C)
        assert set(seen) == {"mlp_before", "mlp_after", "mlp_parallel", "out"}
        assert all(v == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 24), (2, 1, 1, 32)] for v in seen.values())


# -- foundation methods on tiny Swin / ConvNeXt ---------------------------------------------------------
def swin_counts():
    dims = [16, 16, 32, 32]
    return {
        "full": 24_310,
        "linear": 0,
        "lora": sum(2 * 2 * d * 8 for d in dims),  # q and v, A and B, rank 8
        "adapter": sum(2 * d * 8 + 8 + d for d in dims),
    }


def convnext_counts():
    dims = [8, 16, 24, 32]
    return {"full": 25_760, "linear": 0, "adapter": sum(2 * d * 8 + 8 + d for d in dims)}


CASES = [("swin", m) for m in ("full", "linear", "bitfit", "lora", "adapter")] + \
        [("convnext", m) for m in ("full", "linear", "bitfit", "adapter")]


def train_step(model, m, lr=1e-2, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images(4, seed=seed)), torch.tensor([0, 1, 2, 3]))
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("family,method", CASES)
def test_foundation_methods_on_swin_convnext(family, method):
    model, m = build(method, backbone=TINY[family])
    counts = swin_counts() if family == "swin" else convnext_counts()
    if method == "bitfit":
        assert trainable(model) == sum(p.numel() for n, p in model.named_parameters()
                                       if "bias" in n.rsplit(".", 1)[-1] and not n.startswith("head.fc")
                                       and n not in ("head.bias",))  # V-PETL's substring rule: rel-pos tables too
    else:
        assert trainable(model) == counts[method]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_step(model, m)
    after = dict(model.named_parameters())
    assert not [n for n, v in before.items() if not torch.equal(after[n].detach(), v)], "frozen tensors changed"
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(images(4, seed=3)), torch.tensor([4, 5, 6, 7])).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not dead, f"trainable tensors without gradient: {dead[:5]}"


@pytest.mark.parametrize("family,method", [("swin", "lora"), ("swin", "adapter"), ("convnext", "adapter")])
def test_identity_at_init(family, method):
    ref = ours(family).eval()
    model, _ = build(method, backbone=TINY[family])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images(3)), ref(images(3)))


def test_lora_on_swin_merges_exactly():
    model, m = build("lora", backbone=SWIN)
    qkv = model.layers[1].blocks[1].attn.qkv
    assert set(qkv.deltas) == {"q", "v"} and qkv.slices["v"] == slice(64, 96)
    train_step(model, m, lr=5e-2)
    model.eval()
    x = images(3, seed=5)
    with torch.no_grad():
        before = model(x)
        m.merge(model)
        after = model(x)
    assert (before - after).abs().max().item() <= 1e-5
    plain = ours("swin")
    assert set(model.state_dict()) == set(plain.state_dict())
    assert all(isinstance(b.block.attn.qkv, torch.nn.Linear) for b in backbones.sites(model))


def test_adapter_on_convnext_sits_before_layer_scale():
    model, _ = build("adapter", backbone=CONVNEXT)
    blk = model.stages[3].blocks[0]
    ad = blk.petl["mlp_after"][0]
    assert ad.f.down.in_features == 32 and ad.f.down.out_features == 8
    with torch.no_grad():
        ad.f.up.bias.fill_(1.0)  # a constant delta of 1 on every channel before gamma
        x = torch.randn(1, 32, 1, 1)
        ref = blk.mlp(blk.norm(blk.conv_dw(x).permute(0, 2, 3, 1)))
        out = blk(x) - x
    assert torch.allclose(out, ((ref + 1).permute(0, 3, 1, 2)) * blk.gamma.reshape(1, -1, 1, 1), atol=1e-6)


# bitfit: every tensor named *bias*, the 169 x heads relative-position tables included (V-PETL's rule): 137,216 + 63,544
SWIN_B = {"lora": 385_024, "adapter": 204_736, "bitfit": 200_760, "linear": 0}
CONVNEXT_B = {"adapter": 307_104, "bitfit": 130_304, "linear": 0}


@pytest.mark.parametrize("backbone,method,count", [("swin_b", k, v) for k, v in SWIN_B.items()]
                         + [("convnext_b", k, v) for k, v in CONVNEXT_B.items()])
def test_full_size_counts(backbone, method, count):
    rep = vit_b16_params(method, f"backbone={backbone}")
    assert rep["trainable_params"] == count and rep["backbone"] == backbone


def test_bad_family_configs_fail_in_one_line():
    cases = [("swin", {"depth": 2}, "does not use key(s) depth"),
             ("swin", {"depths": [1, 1, 1]}, "backbone.depths and backbone.num_heads need one entry per stage"),
             ("convnext", {"dims": [8, 16]}, "need 4 entries, one per ConvNeXt stage")]
    for family, over, text in cases:
        with pytest.raises(ValueError, match=re.escape(text)) as e:
            ours(family, **over)
        assert "\n" not in str(e.value)
