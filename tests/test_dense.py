"""Dense prediction: Swin-Det backbone, the anchors' parameter counts, decoders, kinds, end-to-end runs."""
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timm.models.swin_transformer import SwinTransformerBlock

from backbones.swin_det import build_swin_det
from bench import CONF_DIR
from tests.helpers import compose_cfg

# backbone trainables (decoder excluded), spec video_dense.md §B3/§D: (Swin-B, Swin-L)
COUNTS = {
    "linear": (0, 0), "full": (86_745_016, 194_998_164), "bitfit": (201_656, 302_484),
    "ln_tune": (59_392, 89_088), "partial": (12_601_632, 28_339_632), "adapter": (3_107_328, 4_659_456),
    "lora": (3_080_192, 4_620_288), "adaptformer": (1_553_664, 2_329_728), "mona": (3_667_456, 5_267_712),
    "lorand": (1_197_312, 1_792_896), "e3va": (1_201_152, 1_798_656),
}


def _trainable_backbone(method: str, backbone: str) -> int:
    import methods
    from torch import nn

    cfg = compose_cfg([f"backbone={backbone}", f"method={method}", "dataset=dense/coco"])
    model = build_swin_det(cfg.backbone, device="meta")
    model.head = nn.Linear(1, 1, device="meta")  # the decoder: always trainable, never counted
    methods.build(cfg.method).apply(model)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))


@pytest.mark.parametrize("method", sorted(COUNTS))
def test_dense_counts_swin_b_and_l(method):
    assert (_trainable_backbone(method, "swin_b"), _trainable_backbone(method, "swin_l")) == COUNTS[method]


def test_swin_det_totals_and_shapes():
    for name, total in (("swin_b", 86_745_016), ("swin_l", 194_998_164)):
        m = build_swin_det(OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml"), device="meta")
        assert sum(p.numel() for p in m.parameters()) == total
        assert m.out_strides == [4, 8, 16, 32]
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "swin_micro.yaml")
    cfg.checkpoint = None
    m = build_swin_det(cfg)
    outs = m.forward_features(torch.randn(1, 3, 50, 77))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 25, 39), (1, 32, 13, 20)]


def test_swin_det_block_equals_pad_then_roll_reference():
    """Our block on a non-multiple-of-window map = timm's own block run on the zero-padded map, cropped
    (the mmdet order: pad the normed map, then roll, mask built for the padded size)."""
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "swin_micro.yaml")
    cfg.checkpoint = None
    m = build_swin_det(cfg).eval()
    blk = m.layers[0].blocks[1]  # shifted windows
    assert any(blk.shift_size)
    x = torch.randn(2, 10, 13, blk.norm1.normalized_shape[0])
    h = blk.norm1(x)
    ours = blk._attn(h)
    wh, ww = blk.window_size
    padded = F.pad(h, (0, 0, 0, (ww - 13 % ww) % ww, 0, (wh - 10 % wh) % wh))
    blk.dynamic_mask = True
    ref = SwinTransformerBlock._attn(blk, padded)[:, :10, :13]
    assert torch.allclose(ours, ref, atol=1e-5)


def _run(overrides, tmp_path):
    from bench.run import run

    cfg = compose_cfg(["backbone=swin_micro", "backbone.checkpoint=null", "train.epochs=1", "train.max_steps=1",
                       "train.batch_size=2", "eval.batch_size=4", "progress=false", "threads=2",
                       f"results.dir={tmp_path}", *overrides])
    return run(cfg)


SMALL_DET = ["dataset.decoder.min_size=64", "dataset.decoder.max_size=64", "dataset.decoder.fpn_channels=16",
             "dataset.decoder.anchor_base=8", "dataset.decoder.out_indices=[0,1]"]


def test_coco_fixture_cascade_end_to_end(tmp_path):
    from tests.dense_fixtures import write_coco

    root = write_coco(tmp_path / "coco")
    rec = _run(["dataset=dense/coco", f"dataset.root={root}", "dataset.num_classes=3", "method=lora", *SMALL_DET,
                "dataset.decoder.head_channels=16", "dataset.decoder.fc_channels=32",
                "dataset.decoder.mask_channels=16", "dataset.decoder.rois_per_image=32",
                "dataset.decoder.rpn_train=64", "dataset.decoder.rpn_test=32"], tmp_path / "r")
    assert rec["kind"] == "detection" and rec["metric"] == "box_ap"
    assert {"box_ap", "box_ap50", "mask_ap"} <= set(rec["metrics"])
    assert rec["trainable_params"] == 4 * 64 * (16 * 2 + 32 * 2)  # the dense LoRA: r 64 on q and v of 4 blocks
    on_disk = json.loads(open(rec["_path"]).read())
    assert on_disk["protocol"]["evaluator"] == "coco"


def test_voc_fixture_retinanet_end_to_end(tmp_path):
    from tests.dense_fixtures import write_voc

    root = write_voc(tmp_path / "voc")
    rec = _run(["dataset=dense/voc", f"dataset.root={root}", "method=bitfit", *SMALL_DET], tmp_path / "r")
    assert rec["metric"] == "box_ap50" and set(rec["metrics"]) == {"box_ap50"}
    assert 0.0 <= rec["score"] <= 100.0


def test_ade20k_fixture_upernet_end_to_end(tmp_path):
    from tests.dense_fixtures import write_ade20k

    root = write_ade20k(tmp_path / "ade")
    rec = _run(["dataset=dense/ade20k", f"dataset.root={root}", "method=mona", "dataset.decoder.out_indices=[0,1]",
                "dataset.decoder.channels=16", "dataset.decoder.aux_channels=8", "dataset.decoder.aux_index=0",
                "dataset.crop_size=[32,32]", "dataset.img_scale=[64,32]", "dataset.test_scale=[64,32]"],
               tmp_path / "r")
    assert rec["kind"] == "segmentation" and rec["metric"] == "miou"
    assert {"miou", "macc", "aacc"} == set(rec["metrics"])


def test_image_backbone_family_check_for_dense():
    from bench import kinds

    with pytest.raises(ValueError, match="detection task"):
        kinds.get("detection").check_backbone("vit", "vit_b16", "dense/coco")


def test_e3va_backbone_runs_without_autograd_and_highway_gets_gradients():
    import methods
    from torch import nn

    cfg = compose_cfg(["backbone=swin_micro", "backbone.checkpoint=null", "method=e3va", "dataset=synthetic/shapes_seg"])
    model = build_swin_det(cfg.backbone)
    model.head = nn.Identity()
    methods.build(cfg.method).apply(model)
    outs = model.forward_features(torch.randn(2, 3, 32, 32))
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    ads = [p for n, p in model.named_parameters() if p.requires_grad and ".petl." in n]
    assert ads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ads)
