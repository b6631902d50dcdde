"""Video backbones (VideoMAE ViT-B, Video Swin-B, the micro ones): counts, shapes, official checkpoint layouts,
and the video methods' trainable-parameter counts (spec video_dense.md §A1, §A3, §D 1-15)."""
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

import backbones
import methods
from backbones.video_vit import sinusoid_table
from bench import CONF_DIR
from bench.metrics import count_params
from helpers import TINY_VIDEO_SWIN, TINY_VIDEO_VIT, clips, compose_cfg


def params(backbone, method, *extra, classes=174):
    from bench.run import params_report

    return params_report(compose_cfg(["mode=params", f"backbone={backbone}", f"method={method}",
                                      f"dataset.num_classes={classes}", *extra]))


# (backbone, method, trainable params excluding the head): spec §A3 parameter summary / issue 11
COUNTS = [
    ("videomae_b", "full", 86_227_200), ("videomae_b", "linear", 0), ("videomae_b", "adaptformer", 1_189_632),
    ("videomae_b", "bapat", 2_093_184), ("videomae_b", "patt", 903_552), ("videomae_b", "lora", 294_912),
    ("videomae_b", "prefix", 368_640), ("videomae_b", "bitfit", 12 * (1_536 + 1_536 + 768 + 3_072 + 768) + 768 + 768),  # q/v, norms, proj, fc1, fc2; embed, fc_norm
    ("video_swin_b", "full", 87_638_984), ("video_swin_b", "linear", 0), ("video_swin_b", "bitfit", 1_090_376),
    ("video_swin_b", "adaptformer", 1_553_664), ("video_swin_b", "patt", 4_647_424),
    ("video_swin_b", "bapat", 6_201_088), ("video_swin_b", "lora", 770_048), ("video_swin_b", "prefix", 4_839_936),
]


@pytest.mark.parametrize("backbone,method,count", COUNTS)
def test_video_method_counts(backbone, method, count):
    r = params(backbone, method)
    assert r["trainable_params"] == count
    assert r["head_params"] == (768 if backbone == "videomae_b" else 1024) * 174 + 174  # SSv2 head


def test_bitfit_counts_relative_position_tables_as_v_petl():
    """V-PETL's ``'bias' in name``: the 2535 x heads tables are trained (137,216 without them)."""
    tables = sum(2535 * h * d for h, d in zip((4, 8, 16, 32), (2, 2, 18, 2)))
    assert params("video_swin_b", "bitfit")["trainable_params"] - tables == 137_216


def test_videomae_tokens_and_sinusoid_table():
    m = backbones.build(OmegaConf.load(CONF_DIR / "backbone" / "videomae_b.yaml"), num_classes=174, device="meta")
    assert m.patch_embed.num_patches == 784 and m.patch_embed.grid_size == (4, 14, 14)
    assert tuple(m.patch_embed.proj.weight.shape) == (768, 3, 2, 16, 16)
    assert m.blocks[0].attn.qkv.bias.shape == (2304,) and not hasattr(m.blocks[0].attn.qkv, "k_bias")
    t784, t1568 = sinusoid_table(784, 768), sinusoid_table(1568, 768)
    assert t784.shape == (1, 784, 768) and torch.equal(t784, t1568[:, :784])
    assert torch.allclose(t784[0, 1, :2], torch.tensor([torch.sin(torch.tensor(1.0)), torch.cos(torch.tensor(1.0))]))


def test_tiny_video_vit_shapes_and_q_v_bias():
    torch.manual_seed(0)
    m = backbones.build(OmegaConf.create(TINY_VIDEO_VIT), num_classes=5).eval()
    x = clips(2)
    tokens = m.patch_embed(x)
    assert tokens.shape == (2, 8, 32)  # (4/2) * (16/8)^2
    assert m(x).shape == (2, 5)
    qkv = m.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.q_bias.fill_(1.0)
        qkv.v_bias.fill_(2.0)
    assert torch.equal(qkv.bias[32:64], torch.zeros(32)) and qkv.bias[:32].eq(1).all() and qkv.bias[64:].eq(2).all()
    with pytest.raises(ValueError, match=r"clips \[B, 3, T, H, W\]"):
        m(torch.zeros(1, 3, 16, 16))


def test_video_swin_b_stage_shapes_at_8_frames():
    """Spec §D-13: (B,3,8,224,224) -> (B,128,4,56,56) after the embedding ... (B,1024,4,7,7); window (4,7,7)."""
    m = backbones.build(OmegaConf.load(CONF_DIR / "backbone" / "video_swin_b.yaml"), num_classes=174, device="meta")
    x = torch.empty(1, 3, 8, 224, 224, device="meta")
    shapes = []
    h = m.patch_embed(x)
    shapes.append(tuple(h.shape))
    for layer in m.features:
        h = layer(h)
        shapes.append(tuple(h.shape))
    assert shapes[0] == (1, 4, 56, 56, 128)
    assert [s for s in shapes[1::2]] == [(1, 4, 56, 56, 128), (1, 4, 28, 28, 256), (1, 4, 14, 14, 512), (1, 4, 7, 7, 1024)]
    assert m.features[0][1].attn.relative_position_bias_table.shape == (2535, 4)
    attn = ShiftedWindowAttention3d(128, [8, 7, 7], [4, 3, 3], 4)  # the same index, built on the CPU
    assert attn.relative_position_index.shape == (392, 392) and int(attn.relative_position_index.max()) == 2534


def test_window_attention_equals_torchvision():
    """The module-call attention (so wrapped qkv/proj linears are used) equals torchvision's functional one."""
    torch.manual_seed(0)
    m = backbones.build(OmegaConf.create(TINY_VIDEO_SWIN), num_classes=5).eval()
    for blk in m.features[0]:  # shift 0 and shifted (mask) blocks
        x = torch.randn(2, 2, 4, 4, 16)
        assert torch.allclose(blk.attn(x), ShiftedWindowAttention3d.forward(blk.attn, x), atol=1e-6)
    assert sum(m.features[0][1].attn.shift_size) > 0


def test_video_swin_pool_is_v_petl_head():
    """V-PETL: avg-pool (2, H', W') stride 1, classifier per position, mean = weights (1/6, 1/3, 1/3, 1/6) at T'=4."""
    torch.manual_seed(0)
    m = backbones.build(OmegaConf.create(TINY_VIDEO_SWIN), num_classes=5)
    f = torch.randn(2, 32, 4, 3, 3)
    w = torch.tensor([1 / 6, 1 / 3, 1 / 3, 1 / 6]).view(1, 1, 4, 1, 1)
    assert torch.allclose(m.pool(f), (f.mean((3, 4), keepdim=True) * w).sum((2, 3, 4)), atol=1e-6)


def official_video_swin_state(model):
    """A torchvision-named state dict written back in the Video Swin release's mmaction layout."""
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "features":
            i = int(parts[1])
            if i % 2 == 0:
                rest = ".".join(parts[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
                k = f"layers.{i // 2}.blocks.{parts[2]}.{rest}"
            else:
                k = f"layers.{i // 2}.downsample.{'.'.join(parts[2:])}"
        elif parts[0] == "head":
            k = "cls_head.fc_cls." + ".".join(parts[1:])
            out[k] = v
            continue
        out["backbone." + k] = v
    return {"state_dict": out, "meta": {"note": "fake"}}


def test_video_swin_loads_official_layout(tmp_path):
    torch.manual_seed(1)
    src = backbones.build(OmegaConf.create(TINY_VIDEO_SWIN), num_classes=7).eval()
    path = tmp_path / "swin_tiny_patch244_window877_kinetics400_22k.pth"
    torch.save(official_video_swin_state(src), path)
    torch.manual_seed(2)
    dst = backbones.build(OmegaConf.create({**TINY_VIDEO_SWIN, "checkpoint": str(path)}), num_classes=7).eval()
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert all(torch.equal(sd_src[k], sd_dst[k]) for k in sd_src if not k.startswith("head."))
    x = clips(2)
    with torch.no_grad():
        assert torch.allclose(src.forward_features(x), dst.forward_features(x))


def test_video_swin_rejects_foreign_checkpoint(tmp_path):
    from backbones.checkpoint import CheckpointError

    path = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"backbone.layers.0.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(CheckpointError, match="does not fit backbone 'video_swin_micro': missing keys"):
        backbones.build(OmegaConf.create({**TINY_VIDEO_SWIN, "checkpoint": str(path)}), num_classes=7)


def test_videomae_loads_pretraining_layout(tmp_path):
    """VideoMAE pre-training .pth: key 'model', encoder under 'encoder.', q_bias/v_bias, decoder and norm dropped."""
    torch.manual_seed(3)
    src = backbones.build(OmegaConf.create(TINY_VIDEO_VIT), num_classes=5).eval()
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith(("head.", "fc_norm.")):
            continue
        sd["encoder." + k.replace("attn.qkv.q_bias", "attn.q_bias").replace("attn.qkv.v_bias", "attn.v_bias")] = v + 0.5 \
            if k.endswith("q_bias") else v
    sd.update({"encoder.norm.weight": torch.ones(32), "encoder.norm.bias": torch.zeros(32),
               "encoder_to_decoder.weight": torch.zeros(16, 32), "mask_token": torch.zeros(1, 1, 16),
               "decoder.blocks.0.mlp.fc1.weight": torch.zeros(4, 16), "decoder.head.weight": torch.zeros(8, 16)})
    path = tmp_path / "videomae_pretrain.pth"
    torch.save({"model": sd}, path)
    dst = backbones.build(OmegaConf.create({**TINY_VIDEO_VIT, "checkpoint": str(path)}), num_classes=5)
    q = dst.blocks[1].attn.qkv
    assert torch.equal(q.q_bias, src.blocks[1].attn.qkv.q_bias + 0.5)
    assert torch.equal(q.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(dst.fc_norm.weight, torch.ones(32))  # created at fine-tuning


def test_video_micro_inflates_the_shipped_vit_micro():
    """The 2-D patch kernel repeated over the tubelet / 2: a clip whose frames are all one image gives the
    image's patch features; the k bias (attention-invariant) is dropped, q and v kept."""
    from safetensors.torch import load_file

    cfg = OmegaConf.load(CONF_DIR / "backbone" / "video_micro.yaml")
    path = str(CONF_DIR.parent / "backbones" / "weights" / "vit_micro_fractal.safetensors")
    m = backbones.build(OmegaConf.merge(cfg, {"checkpoint": path}), num_classes=8)
    sd2 = {k: v.float() for k, v in load_file(path).items()}
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        two_d = torch.nn.functional.conv2d(img, sd2["patch_embed.proj.weight"], sd2["patch_embed.proj.bias"], stride=4)
        three_d = m.patch_embed.proj(img[:, :, None].expand(-1, -1, 8, -1, -1))
    assert torch.allclose(three_d[:, :, 0], two_d, atol=1e-5)
    assert torch.equal(m.blocks[0].attn.qkv.v_bias, sd2["blocks.0.attn.qkv.bias"][192:])


def test_unsupported_method_on_video_family_names_both():
    torch.manual_seed(0)
    model = backbones.build(OmegaConf.create(TINY_VIDEO_SWIN), num_classes=5)
    from backbones.sites import MethodNotDefinedError

    with pytest.raises(MethodNotDefinedError, match="'vpt_shallow' is not defined for backbone family 'video_swin'"):
        methods.build(OmegaConf.create({"name": "vpt_shallow"})).apply(model)


def test_patt_perturbs_only_keys_and_values():
    """PATT adds λΔ to the k and v rows of qkv only; q rows are the frozen projection's."""
    from helpers import build

    model, _ = build("patt", backbone=TINY_VIDEO_VIT, mid_dim=4)
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(3, 32)
    with torch.no_grad():
        out, base = qkv(x), qkv.base(x)
    assert torch.equal(out[:, :32], base[:, :32]) and not torch.allclose(out[:, 32:], base[:, 32:])
    assert count_params(model, backbones.head_of(model))["trainable_params"] == 2 * (3 * 4 * 32 + 4 + 64)


def test_video_swin_adaptformer_lives_inside_the_mlp():
    """V-PETL's Video-Swin AdaptFormer: input LN2(x), added before the drop-path (mlp_inner); ViT: outside."""
    from helpers import build

    model, _ = build("adaptformer", backbone=TINY_VIDEO_SWIN)
    blk = model.features[0][0]
    assert "mlp_inner" in blk.petl and "mlp_parallel" not in blk.petl and blk.petl["mlp_inner"][0].source == "normed"
    vit, _ = build("adaptformer", backbone=TINY_VIDEO_VIT)
    assert "mlp_parallel" in vit.blocks[0].petl and vit.blocks[0].petl["mlp_parallel"][0].source == "residual"
