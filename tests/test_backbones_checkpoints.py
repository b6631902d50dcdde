"""Official checkpoint layouts: fake files written in each official layout (by inverting timm's converters)
load back through ``backbones.build(cfg with checkpoint=...)`` tensor for tensor; files of the wrong
backbone fail with one line naming missing/unexpected keys and shapes; exact backbone sizes."""
import re

import numpy as np
import pytest
import torch

import backbones
from backbones.checkpoint import CheckpointError, detect_format
from helpers import compose_cfg, vit_b16_params

SIZES = {  # parameters without the head (mode=params on the meta device)
    "vit_b16": 85_798_656, "vit_b16_mae": 85_798_656, "vit_b16_mocov3": 85_798_656,
    "vit_l16": 303_301_632, "vit_h14": 630_764_800,
    "swin_b": 86_743_224, "swin_l": 194_995_476, "convnext_b": 87_566_464,
}
HEADS = {"vit_b16": 76_900, "vit_l16": 102_500, "vit_h14": 128_100, "swin_b": 102_500, "swin_l": 153_700,
         "convnext_b": 102_500}


@pytest.mark.parametrize("name", SIZES)
def test_backbone_sizes(name):
    rep = vit_b16_params("full", f"backbone={name}")
    assert rep["trainable_params"] == SIZES[name]
    assert rep["total_params"] - rep["head_params"] == SIZES[name]
    assert rep["head_params"] == HEADS.get(name, 76_900)  # 100 classes


# -- official layouts, written by inverting timm's converters -------------------------------------
def google_npz(sd, heads, path, extra_head=True):
    """Invert timm's ``vision_transformer._load_weights`` (original Google ViT npz names and layouts)."""
    D = sd["cls_token"].shape[-1]
    hd = D // heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    for i in range(depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].chunk(3), sd[b + "attn.qkv.bias"].chunk(3)
        for n, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = wt.T.reshape(D, heads, hd)
            w[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = bs.reshape(heads, hd)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].reshape(D, heads, hd).permute(1, 2, 0)
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, t in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = sd[b + t + ".weight"], sd[b + t + ".bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    if extra_head:  # the 2020 in21k files carry a 21843-class head and a pre-logits layer: both ignored
        w["head/kernel"], w["head/bias"] = torch.zeros(D, 21843), torch.zeros(21843)
        w["pre_logits/kernel"], w["pre_logits/bias"] = torch.ones(D, D), torch.ones(D)
    np.savez(path, **{k: v.detach().float().contiguous().numpy() for k, v in w.items()})


def mae_pth(sd, path):
    """MAE's ``mae_pretrain_vit_base.pth``: {'model': encoder state dict, timm names, no head}."""
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("head.")}}, path)


def mocov3_linear(sd, path):
    """MoCo v3's ``linear-vit-b-300ep.pth.tar``: DDP ``module.`` prefix, an ImageNet linear head, extras."""
    state = {f"module.{k}": v for k, v in sd.items() if not k.startswith("head.")}
    D = sd["cls_token"].shape[-1]
    state["module.head.weight"], state["module.head.bias"] = torch.zeros(1000, D), torch.zeros(1000)
    torch.save({"epoch": 90, "arch": "vit_base", "state_dict": state, "best_acc1": 76.7,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)


def mocov3_pretrain(sd, path):
    """MoCo v3's pre-training file: ``module.base_encoder.`` / ``module.momentum_encoder.`` / predictor."""
    state = {}
    for k, v in sd.items():
        if not k.startswith("head."):
            state[f"module.base_encoder.{k}"] = v
            state[f"module.momentum_encoder.{k}"] = torch.zeros_like(v)
    state["module.base_encoder.head.0.weight"] = torch.zeros(16, sd["cls_token"].shape[-1])
    state["module.predictor.0.weight"] = torch.zeros(16, 16)
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state}, path)


def swin_official(model, path, classes=21841):
    """Microsoft Swin layout (inverse of timm's swin ``checkpoint_filter_fn``): downsample at the end of
    the previous stage, stored relative_position_index / attn_mask buffers, plain ``head``."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        sd[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            sd[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = blk.attn.relative_position_index
            if blk.attn_mask is not None:
                sd[f"layers.{i}.blocks.{j}.attn_mask"] = blk.attn_mask
    D = model.num_features
    sd["head.weight"], sd["head.bias"] = torch.zeros(classes, D), torch.zeros(classes)
    torch.save({"model": sd}, path)
    return sd


def convnext_official(model, path, classes=21841):
    """FB ConvNeXt layout (inverse of timm's convnext ``checkpoint_filter_fn``)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("head.fc."):
            continue
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm.", "norm.")
        sd[k] = v
    D = model.num_features
    sd["head.weight"], sd["head.bias"] = torch.zeros(classes, D), torch.zeros(classes)
    torch.save({"model": sd, "epoch": 89}, path)
    return sd


# -- helpers ------------------------------------------------------------------------------------
def make(name, *over, checkpoint=None, seed=0, num_classes=10):
    cfg = compose_cfg([f"backbone={name}", *over] + ([f"backbone.checkpoint={checkpoint}"] if checkpoint else []))
    torch.manual_seed(seed)
    return backbones.build(cfg.backbone, num_classes=num_classes)


def assert_loaded(src, dst, head=("head.",)):
    a, b = src.state_dict(), dst.state_dict()
    assert set(a) == set(b)
    body = [k for k in a if not k.startswith(head)]
    assert body and len(body) == len(a) - sum(k.startswith(head) for k in a)
    differ = [k for k in body if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors not loaded: {differ[:5]}"
    # the task head keeps its own initialisation (never the checkpoint's)
    fresh = {k: v for k, v in b.items() if k.startswith(head)}
    assert fresh and all(v.shape[0] == 10 for k, v in fresh.items() if k.endswith("weight"))


VIT_SMALL = ["backbone.depth=1"]
NPZ = {"vit_b16": 12, "vit_l16": 16, "vit_h14": 16}


@pytest.mark.parametrize("name", NPZ)
def test_google_npz_loads_exactly(name, tmp_path):
    src = make(name, *VIT_SMALL, seed=1)
    path = tmp_path / f"ViT-{name}.npz"
    google_npz(src.state_dict(), NPZ[name], path)
    assert detect_format(path) == "npz"
    dst = make(name, *VIT_SMALL, checkpoint=path, seed=2)
    assert_loaded(src, dst)


def test_mae_pth_loads_exactly(tmp_path):
    src = make("vit_b16_mae", *VIT_SMALL, seed=1)
    path = tmp_path / "mae_pretrain_vit_base.pth"
    mae_pth(src.state_dict(), path)
    assert_loaded(src, make("vit_b16_mae", *VIT_SMALL, checkpoint=path, seed=2))
    # the same file in torch's legacy (pre-1.6, non-zip) pickle format, with the MAE decoder kept
    legacy = tmp_path / "mae_visualize_vit_base.pth"
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    sd.update({"mask_token": torch.zeros(1, 1, 512), "decoder_embed.weight": torch.zeros(512, 768)})
    torch.save({"model": sd}, legacy, _use_new_zipfile_serialization=False)
    assert detect_format(legacy) == "torch" and not __import__("zipfile").is_zipfile(legacy)
    assert_loaded(src, make("vit_b16_mae", *VIT_SMALL, checkpoint=legacy, seed=2))


@pytest.mark.parametrize("writer", [mocov3_linear, mocov3_pretrain])
def test_mocov3_tar_loads_exactly(writer, tmp_path):
    src = make("vit_b16_mocov3", *VIT_SMALL, seed=1)
    path = tmp_path / "linear-vit-b-300ep.pth.tar"
    writer(src.state_dict(), path)
    assert detect_format(path) == "torch"
    assert_loaded(src, make("vit_b16_mocov3", *VIT_SMALL, checkpoint=path, seed=2))


@pytest.mark.parametrize("name,heads", [("swin_b", "[4,8]"), ("swin_l", "[6,12]")])
def test_swin_official_loads_exactly(name, heads, tmp_path):
    # the first two stages at their real widths, for speed; stage 0 keeps a shifted block (attn_mask stored)
    over = ["backbone.depths=[2,1]", f"backbone.num_heads={heads}"]
    src = make(name, *over, seed=1)
    path = tmp_path / f"{name}_patch4_window7_224_22k.pth"
    sd = swin_official(src, path)
    assert "layers.0.downsample.reduction.weight" in sd and "layers.0.blocks.1.attn_mask" in sd
    assert_loaded(src, make(name, *over, checkpoint=path, seed=2))


def test_convnext_official_loads_exactly(tmp_path):
    over = ["backbone.depths=[1,1,1,1]"]
    src = make("convnext_b", *over, seed=1)
    path = tmp_path / "convnext_base_22k_224.pth"
    sd = convnext_official(src, path)
    assert "downsample_layers.0.0.weight" in sd and "stages.3.0.pwconv2.weight" in sd and "norm.weight" in sd
    dst = make("convnext_b", *over, checkpoint=path, seed=2)
    assert_loaded(src, dst, head=("head.fc.",))  # head.norm is backbone: loaded


def test_timm_safetensors_and_micro_families(tmp_path):
    from safetensors.torch import save_file

    for name, head in (("vit_micro", ("head.",)), ("swin_micro", ("head.",)), ("convnext_micro", ("head.fc.",))):
        src = make(name, seed=1)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
        assert detect_format(path) == "safetensors"
        assert_loaded(src, make(name, checkpoint=path, seed=2), head=head)


def one_line_error(fn):
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_wrong_backbone_fails_with_keys_and_shapes(tmp_path):
    # a ViT-L npz into ViT-B: same names, other widths
    path = tmp_path / "ViT-L_16.npz"
    google_npz(make("vit_l16", *VIT_SMALL).state_dict(), 16, path)
    msg = one_line_error(lambda: make("vit_b16", *VIT_SMALL, checkpoint=path))
    assert "does not fit backbone 'vit_b16'" in msg and "Google ViT .npz" in msg
    assert "shapes differ (checkpoint vs model): cls_token (1, 1, 1024) vs (1, 1, 768)" in msg
    # a depth-1 MAE file into a depth-2 ViT: missing block keys
    mae = tmp_path / "mae.pth"
    mae_pth(make("vit_b16_mae", *VIT_SMALL).state_dict(), mae)
    msg = one_line_error(lambda: make("vit_b16_mae", "backbone.depth=2", checkpoint=mae))
    assert "missing keys: blocks.1.norm1.weight" in msg and "unexpected keys: none" in msg
    # a Swin file into ConvNeXt and a ConvNeXt file into Swin: foreign names both ways
    sw, cn = tmp_path / "swin.pth", tmp_path / "convnext.pth"
    swin_official(make("swin_micro"), sw)
    convnext_official(make("convnext_micro"), cn)
    msg = one_line_error(lambda: make("convnext_micro", checkpoint=sw))
    assert "(file layout: Microsoft Swin)" in msg and "missing keys: stem.0.weight" in msg
    assert "unexpected keys: patch_embed.proj.weight" in msg and "layers.0.blocks.0.attn.qkv.weight" in msg
    msg = one_line_error(lambda: make("swin_micro", checkpoint=cn))
    assert "(file layout: FB ConvNeXt)" in msg and "missing keys: patch_embed.proj.weight" in msg
    # an npz into a Swin, a missing file, a file that is no checkpoint
    msg = one_line_error(lambda: make("swin_micro", checkpoint=path))
    assert "JAX .npz" in msg and "swin_micro" in msg
    msg = one_line_error(lambda: make("vit_micro", checkpoint=tmp_path / "nope.pth"))
    assert "not found" in msg and "backbone.checkpoint=PATH" in msg
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3, dtype=np.float32))
    assert "not a Google ViT checkpoint" in one_line_error(lambda: make("vit_micro", checkpoint=other))
    broken = tmp_path / "broken.npz"  # a Google npz with one array cut out
    with np.load(path) as w:
        np.savez(broken, **{k: w[k] for k in w.files if k != "Transformer/encoderblock_0/LayerNorm_2/scale"})
    msg = one_line_error(lambda: make("vit_l16", *VIT_SMALL, checkpoint=broken))
    assert "timm's npz loader" in msg and "LayerNorm_2/scale" in msg
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    assert "cannot read checkpoint" in one_line_error(lambda: make("vit_micro", checkpoint=junk))


def test_meta_device_skips_loading(tmp_path):
    cfg = compose_cfg(["backbone=swin_b", f"backbone.checkpoint={tmp_path / 'absent.pth'}"])
    model = backbones.build(cfg.backbone, num_classes=5, device="meta")  # counting never reads the file
    assert next(model.parameters()).is_meta
