"""Video end to end through the runner: a csv + mp4 folder in the anchors' layout (written with PyAV) trains one
epoch on VideoMAE-shaped and Video-Swin-shaped tiny backbones and writes a record with metric top1 and the
view protocol; recipes and counts compose with the video datasets; mismatched backbone/task stop early."""
import json

import pytest

from bench.run import run
from helpers import compose_cfg
from video_fixtures import write_video_folder

VIDEO_VIT = ["backbone=video_micro", "backbone.checkpoint=null", "backbone.img_size=32", "backbone.embed_dim=32",
             "backbone.depth=2", "backbone.num_heads=2", "backbone.num_frames=4", "backbone.frame_stride=2"]
VIDEO_SWIN = ["backbone=video_swin_micro", "backbone.embed_dim=16", "backbone.num_heads=[1,2]",
              "backbone.num_frames=4", "backbone.frame_stride=2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_video_folder(tmp_path_factory.mktemp("hmdb51"), n_train=8, n_test=4, num_classes=51, frames=12,
                              size=(40, 32))


@pytest.mark.parametrize("backbone,method,spatial", [(VIDEO_VIT, "adaptformer", 3), (VIDEO_SWIN, "bapat", 1)])
def test_fixture_folder_trains_one_epoch_and_records_the_views(folder, tmp_path, backbone, method, spatial):
    over = [*backbone, f"method={method}", "dataset=video/hmdb51", f"dataset.root={folder}", "train.epochs=1",
            "train.batch_size=4", "train.warmup_epochs=0", f"dataset.eval_views.spatial={spatial}",
            f"dataset.cache_dir={tmp_path / 'cache'}", f"results.dir={tmp_path}", "progress=false"]
    rec = run(compose_cfg(over), over)
    saved = json.loads(open(rec["_path"]).read())
    assert saved["kind"] == "video_cls" and saved["metric"] == "top1" and saved["benchmark"] == "video"
    assert saved["score"] == saved["top1"] == saved["metrics"]["top1"] and 0 <= saved["top1"] <= 100
    assert saved["protocol"]["views"] == 4 * spatial and saved["protocol"]["eval_views"]["spatial"] == spatial
    assert saved["protocol"]["frames"] == 4 and saved["protocol"]["stride"] == 2
    assert saved["protocol"]["eval_split"] == "val_csv" and saved["task_info"]["csv"]
    assert saved["perf"]["steps"] == 2  # 8 clips / batch 4


def test_recipe_of_the_video_loop_follows_the_backbone():
    swin = compose_cfg(["backbone=video_swin_b", "method=adaptformer", "dataset=video/ssv2"])
    vit = compose_cfg(["backbone=videomae_b", "method=adaptformer", "dataset=video/ssv2"])
    assert (swin.train.epochs, swin.train.lr, swin.train.batch_size, swin.train.drop_path) == (70, 0.00625, 16, 0.4)
    assert (vit.train.epochs, vit.train.lr, vit.train.optimizer, swin.train.optimizer) == (90, 0.4, "sgd", "sgd")
    assert swin.dataset.eval_views.spatial == 1 and vit.dataset.eval_views.spatial == 3
    assert swin.dataset.stride == 2 and vit.dataset.stride == 4 and swin.dataset.frames == vit.dataset.frames == 8
    assert compose_cfg(["backbone=videomae_b", "method=adaptformer", "dataset=video/ssv2", "train.lr=0.1"]).train.lr == 0.1


def test_issue_count_through_the_video_dataset():
    """``mode=params backbone=video_swin_b method=bitfit dataset=video/ssv2`` prints 1,090,376."""
    from bench.run import params_report

    r = params_report(compose_cfg(["mode=params", "backbone=video_swin_b", "method=bitfit", "dataset=video/ssv2"]))
    assert r["trainable_params"] == 1_090_376 and r["head_params"] == 1024 * 174 + 174


@pytest.mark.parametrize("over,match", [
    (["backbone=vit_micro", "dataset=synthetic/moving_dsprites"], "video_cls task, which backbone 'vit_micro'"),
    (["backbone=video_micro", "dataset=synthetic/dsprites_loc"], "image_cls task, which backbone 'video_micro'"),
])
def test_backbone_and_task_kind_must_match(over, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run(compose_cfg([*over, f"results.dir={tmp_path}"]), over)
