"""VTAB-1k and FGVC loaders on tiny on-disk fixtures with real JPEG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

import datasets
from bench import CONF_DIR
from data_fixtures import FGVC_SPLITS, VTAB_SIZES, make_fgvc_dataset, make_vtab_task
from datasets.base import DataError
from datasets.fgvc import FGVC_DATASETS
from datasets.images import STATS, RaggedCropDataset, shorter_side_size
from datasets.vtab import GROUPS, VTAB_TASKS

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def cfg_of(name: str, **over):
    cfg = OmegaConf.load(Path(CONF_DIR) / "dataset" / f"{name}.yaml")
    return OmegaConf.merge(cfg, over)


def all_items(ds):
    return ds.__getitems__(list(range(len(ds))))


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab-1k")
    make_vtab_task(root, "cifar", 100, seed=1)  # NOAH/FacT spelling of cifar100, NOAH's separate copies
    make_vtab_task(root, "dtd", 47, seed=2)
    make_vtab_task(root, "cifar100", 100, seed=3, separate_copies=True)
    return root


@pytest.fixture(scope="module")
def fgvc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fgvc")
    make_fgvc_dataset(root, "CUB_200_2011", "images", seed=4)
    make_fgvc_dataset(root, "OxfordFlower", "", seed=5)
    return root


# ---------------------------------------------------------------- tables and configs


def test_vtab_table_19_tasks_940_classes_and_groups():
    assert len(VTAB_TASKS) == 19
    assert sum(c for c, _, _ in VTAB_TASKS.values()) == 940
    groups = [g for _, g, _ in VTAB_TASKS.values()]
    assert [groups.count(g) for g in GROUPS] == [7, 4, 8]
    assert VTAB_TASKS["dsprites_loc"][2] == 73728 and VTAB_TASKS["kitti"][2] == 711


def test_every_vtab_and_fgvc_yaml_matches_the_tables():
    for task, (classes, group, test) in VTAB_TASKS.items():
        cfg = cfg_of(f"vtab/{task}")
        assert cfg.name == f"vtab/{task}" and cfg.benchmark == "vtab"
        assert cfg.num_classes == classes and cfg.group == group
        assert cfg.folders[0] == task and cfg.interpolation == "bicubic"
        assert dict(cfg.roles) == {"train": "train800", "val": "val200", "trainval": "train800val200", "test": "test"}
    aug = {t for t in VTAB_TASKS if cfg_of(f"vtab/{t}").train_aug}
    assert aug == {"dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397", "patch_camelyon", "eurosat",
                   "resisc45", "diabetic_retinopathy", "clevr_count", "dmlab", "kitti"}  # V-PETL's configs (spec §7)
    assert [cfg_of(f"vtab/{t}").folders for t in ("cifar100", "oxford_iiit_pet", "diabetic_retinopathy")] == [
        ["cifar100", "cifar"], ["oxford_iiit_pet", "oxford_pet"], ["diabetic_retinopathy", "diabetic_retinopathy_detection"]]
    assert {k: cfg_of(f"fgvc/{k}").num_classes for k in FGVC_DATASETS} == {
        "cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}
    assert {k: cfg_of(f"fgvc/{k}").image_dir for k in FGVC_DATASETS} == {
        "cub": "images", "nabirds": "images", "flowers": "", "dogs": "Images", "cars": ""}
    for k in FGVC_DATASETS:
        assert dict(cfg_of(f"fgvc/{k}").roles)["trainval"] == "train"  # VPT and V-PETL train on train.json


# ---------------------------------------------------------------- VTAB


def test_vtab_reads_lists_labels_and_both_spellings(vtab_root, tmp_path):
    # only "cifar" exists under this root: the alias is found
    alias_root = tmp_path / "alias"
    alias_root.mkdir()
    (alias_root / "cifar").symlink_to(vtab_root / "cifar")
    task = datasets.build(cfg_of("vtab/cifar100", root=str(alias_root)), image_size=32, mean=MEAN, std=STD)
    assert task.info["folder"].endswith("/cifar") and task.num_classes == 100 and task.benchmark == "vtab"
    for split, n in {**VTAB_SIZES, "train800val200": 12}.items():
        x, y = all_items(task.splits[split])
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
    lines = (vtab_root / "cifar" / "test.txt").read_text().split("\n")
    want = [int(ln.split()[1]) for ln in lines if ln]
    assert all_items(task.split("test"))[1].tolist() == want
    # canonical spelling is preferred when both exist; root may also be the task folder itself
    t2 = datasets.build(cfg_of("vtab/cifar100", root=str(vtab_root)), image_size=32, mean=MEAN, std=STD)
    assert t2.info["folder"].endswith("/cifar100")
    t3 = datasets.build(cfg_of("vtab/dtd", root=str(vtab_root / "dtd")), image_size=32, mean=MEAN, std=STD)
    assert t3.info["folder"] == str(vtab_root / "dtd") and t3.split("val").labels.tolist() == [
        (k * 7) % 47 for k in range(8, 12)]
    # NOAH layout (separate train800val200 copies) gives the same pixels as train800 + val200
    a = torch.cat([t2.splits["train800"].images, t2.splits["val200"].images])
    assert torch.equal(t2.splits["train800val200"].images, a)


def test_vtab_eval_pixels_equal_torchvision_pipeline(vtab_root):
    """Bicubic Resize((S, S)) -> ToTensor -> Normalize, as NOAH/FacT: identical up to float rounding."""
    for interp, mode in (("bicubic", T.InterpolationMode.BICUBIC), ("bilinear", T.InterpolationMode.BILINEAR)):
        task = datasets.build(cfg_of("vtab/dtd", root=str(vtab_root), interpolation=interp), image_size=24,
                              mean=MEAN, std=STD)
        x, _ = task.split("test").__getitems__([0, 3])
        ref_tf = T.Compose([T.Resize((24, 24), interpolation=mode), T.ToTensor(), T.Normalize(MEAN, STD)])
        ref = torch.stack([ref_tf(Image.open(vtab_root / "dtd" / f"images/test/{i:06d}.jpg").convert("RGB"))
                           for i in (0, 3)])
        assert x.shape == (2, 3, 24, 24)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
        assert task.info["transform"]["eval"] == f"Resize((24, 24), {interp}) -> Normalize"


def test_vtab_cache_hit_decodes_nothing_and_memmap_is_equal(vtab_root):
    cfg = cfg_of("vtab/dtd", root=str(vtab_root))
    t1 = datasets.build(cfg, image_size=20, mean=MEAN, std=STD)
    x1 = all_items(t1.split("test"))[0]
    before = STATS["decoded"]
    t2 = datasets.build(cfg, image_size=20, mean=MEAN, std=STD)
    x2 = all_items(t2.split("test"))[0]
    assert STATS["decoded"] == before  # second load: no JPEG decoded
    assert torch.equal(x1, x2) and t2.info["cache"]["test"]["key"] == t1.info["cache"]["test"]["key"]
    assert t2.info["cache"]["test"]["storage"] == "memory"
    t3 = datasets.build(OmegaConf.merge(cfg, {"in_memory_max_mb": 0}), image_size=20, mean=MEAN, std=STD)
    x3 = all_items(t3.split("test"))[0]
    assert t3.info["cache"]["test"]["storage"] == "memmap" and torch.equal(x1, x3) and STATS["decoded"] == before
    assert Path(t1.info["cache"]["test"]["cache"], "images.npy").is_file()
    # another size is another cache entry (decodes again)
    datasets.build(cfg, image_size=16, mean=MEAN, std=STD).split("test").images
    assert STATS["decoded"] == before + VTAB_SIZES["test"]


def test_vtab_splits_are_lazy(vtab_root):
    before = STATS["decoded"]
    task = datasets.build(cfg_of("vtab/cifar100", root=str(vtab_root), interpolation="nearest"), image_size=8,
                          mean=MEAN, std=STD)
    assert sorted(task.splits) == ["test", "train800", "train800val200", "val200"] and STATS["decoded"] == before
    task.split("val")
    assert STATS["decoded"] == before + VTAB_SIZES["val200"]


def test_vtab_train_aug_only_on_training_splits(vtab_root):
    task = datasets.build(cfg_of("vtab/dtd", root=str(vtab_root), train_aug=True), image_size=32, mean=MEAN, std=STD)
    assert task.split("train").pil_transform is not None and task.split("trainval").pil_transform is not None
    assert task.split("val").pil_transform is None and task.split("test").pil_transform is None
    assert "RandAugment(rand-m9-mstd0.5-inc1)" in task.info["transform"]["train"]
    torch.manual_seed(0)
    ds = task.split("train")
    x, y = ds.__getitems__(list(range(8)))
    plain = (ds.images.float() / 255 - ds.mean) / ds.std
    assert x.shape == (8, 3, 32, 32) and not torch.equal(x, plain)
    assert torch.equal(y, ds.labels)


def test_vtab_corrupt_jpeg_names_file_and_line(vtab_root, tmp_path):
    d = make_vtab_task(tmp_path, "kitti", 4, seed=9)
    bad = d / "images/test/000002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    task = datasets.build(cfg_of("vtab/kitti", root=str(tmp_path)), image_size=16, mean=MEAN, std=STD)
    with pytest.raises(DataError) as e:
        task.split("test")
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and f"{d / 'test.txt'} line 3" in msg
    task.split("train")  # the other splits are fine


def test_vtab_missing_root_and_bad_lists(tmp_path):
    with pytest.raises(DataError) as e:
        datasets.build(cfg_of("vtab/svhn", root=str(tmp_path / "nowhere")), image_size=16, mean=MEAN, std=STD)
    msg = str(e.value)
    assert "\n" not in msg and "does not exist" in msg and "dataset.root" in msg and "Getting the data" in msg
    with pytest.raises(DataError, match="has no folder cifar100 or cifar"):
        datasets.build(cfg_of("vtab/cifar100", root=str(tmp_path)), image_size=16, mean=MEAN, std=STD)
    with pytest.raises(DataError, match="dataset.root is not set"):
        datasets.build(cfg_of("vtab/svhn", root=None), image_size=16, mean=MEAN, std=STD)
    d = make_vtab_task(tmp_path, "eurosat", 10)
    (d / "val200.txt").unlink()
    with pytest.raises(DataError, match="list file missing: .*val200.txt"):
        datasets.build(cfg_of("vtab/eurosat", root=str(tmp_path)), image_size=16, mean=MEAN, std=STD)
    d = make_vtab_task(tmp_path, "kitti", 4)
    (d / "test.txt").write_text("images/test/000000.jpg 7\n")
    task = datasets.build(cfg_of("vtab/kitti", root=str(tmp_path)), image_size=16, mean=MEAN, std=STD)
    with pytest.raises(DataError, match=r"test.txt line 1: label 7 outside \[0, 4\)"):
        task.split("test")


# ---------------------------------------------------------------- FGVC


def test_fgvc_union_label_mapping_and_counts(fgvc_root):
    task = datasets.build(cfg_of("fgvc/cub", root=str(fgvc_root), num_classes=3), image_size=32, mean=MEAN, std=STD)
    assert task.info["folder"].endswith("CUB_200_2011") and task.info["image_dir"].endswith("CUB_200_2011/images")
    cont = {1: 0, 5: 1, 9: 2}  # sorted union of {1,5,9} (train), {1,9} (val), {5,9} (test)
    for split in ("train", "val", "test"):
        _, y = all_items(task.splits[split])
        assert y.tolist() == [cont[v] for v in FGVC_SPLITS[split].values()], split
    # a per-split mapping (official) would have given test labels [0, 1, 1]; ours keeps class 9 -> 2 everywhere
    assert all_items(task.split("test"))[1].tolist() == [1, 2, 2]
    assert task.roles == {"train": "train", "val": "val", "trainval": "train", "test": "test"}
    tv = datasets.build(cfg_of("fgvc/cub", root=str(fgvc_root), num_classes=3, roles={"trainval": "train+val"}),
                        image_size=32, mean=MEAN, std=STD)
    assert len(tv.split("trainval")) == 8 and tv.split("trainval").labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 2]
    with pytest.raises(DataError, match="3 distinct class ids .* dataset.num_classes=200"):
        datasets.build(cfg_of("fgvc/cub", root=str(fgvc_root)), image_size=32, mean=MEAN, std=STD)


def test_fgvc_transforms_follow_backbone_size(fgvc_root):
    task = datasets.build(cfg_of("fgvc/flowers", root=str(fgvc_root), num_classes=3), image_size=32, mean=MEAN, std=STD)
    resize = round(32 * 256 / 224)
    assert resize == 37 and task.info["transform"]["eval"] == "Resize(37, bilinear) -> CenterCrop(32) -> Normalize"
    train = task.split("train")
    assert isinstance(train, RaggedCropDataset)
    # stored at shorter side 37 (torchvision Resize(int) arithmetic), landscape and portrait
    assert [tuple(train.image(i).shape) for i in (0, 1)] == [(3, 37, 49), (3, 49, 37)]
    assert shorter_side_size(40, 30, 37) == (49, 37) and shorter_side_size(224, 500, 256) == (256, 571)
    torch.manual_seed(0)
    x1, y = train.__getitems__([0, 1, 2])
    x2, _ = train.__getitems__([0, 1, 2])
    assert x1.shape == (3, 3, 32, 32) and not torch.equal(x1, x2)  # random crop/flip per batch
    # each crop is a window of the stored image (possibly flipped)
    img = (train.image(0).float() / 255 - train.mean[0]) / train.std[0]
    windows = [img[:, t:t + 32, l:l + 32] for t in range(6) for l in range(18)]
    assert any(torch.allclose(x1[0], w) or torch.allclose(x1[0], w.flip(-1)) for w in windows)
    # eval: Resize(37) -> CenterCrop(32) exactly as torchvision on the PIL image
    x, _ = task.split("test").__getitems__([0, 1])
    ref_tf = T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])
    names = list(FGVC_SPLITS["test"])[:2]
    ref = torch.stack([ref_tf(Image.open(fgvc_root / "OxfordFlower" / n).convert("RGB")) for n in names])
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)


def test_fgvc_cache_hit_and_errors(fgvc_root, tmp_path):
    cfg = cfg_of("fgvc/flowers", root=str(fgvc_root), num_classes=3)
    datasets.build(cfg, image_size=24, mean=MEAN, std=STD).split("train").data
    before = STATS["decoded"]
    t = datasets.build(cfg, image_size=24, mean=MEAN, std=STD)
    t.split("train").data, t.split("test").images  # test decodes (new), train is a hit
    assert STATS["decoded"] == before + len(FGVC_SPLITS["test"])
    d = make_fgvc_dataset(tmp_path, "StanfordDogs", "Images", seed=7)
    bad = d / "Images" / "b" / "7.jpg"
    bad.write_bytes(b"garbage")
    task = datasets.build(cfg_of("fgvc/dogs", root=str(tmp_path), num_classes=3), image_size=16, mean=MEAN, std=STD)
    with pytest.raises(DataError) as e:
        task.split("val")
    assert "\n" not in str(e.value) and str(bad) in str(e.value) and f"{d / 'val.json'} key 'b/7.jpg'" in str(e.value)
    with pytest.raises(DataError, match="FGVC dataset 'cars' not found: .* has no folder StanfordCars"):
        datasets.build(cfg_of("fgvc/cars", root=str(tmp_path)), image_size=16, mean=MEAN, std=STD)
    (d / "test.json").unlink()
    with pytest.raises(DataError, match="split file missing: .*test.json"):
        datasets.build(cfg_of("fgvc/dogs", root=str(tmp_path), num_classes=3), image_size=16, mean=MEAN, std=STD)


def test_decoded_arrays_are_uint8_rgb(vtab_root):
    task = datasets.build(cfg_of("vtab/dtd", root=str(vtab_root)), image_size=12, mean=MEAN, std=STD)
    imgs = task.split("train").images
    assert imgs.dtype == torch.uint8 and imgs.shape == (8, 3, 12, 12)
    ref = np.asarray(Image.open(vtab_root / "dtd/images/train800/000000.jpg").convert("RGB").resize((12, 12), Image.BICUBIC))
    assert np.array_equal(imgs[0].permute(1, 2, 0).numpy(), ref)


def test_default_roots_come_from_env(monkeypatch, tmp_path):
    from helpers import compose_cfg

    monkeypatch.setenv("PETL_BENCH_VTAB", str(tmp_path / "v"))
    monkeypatch.setenv("PETL_BENCH_FGVC", str(tmp_path / "f"))
    assert compose_cfg(["dataset=vtab/kitti"]).dataset.root == str(tmp_path / "v")
    assert compose_cfg(["dataset=fgvc/cub"]).dataset.root == str(tmp_path / "f")
    monkeypatch.delenv("PETL_BENCH_VTAB")
    assert compose_cfg(["dataset=vtab/kitti"]).dataset.root == "data/vtab-1k"


def test_randaugment_posterize_zero_bits_gives_black():
    """timm asks Pillow for 0 posterize bits at high magnitudes; old Pillow gave black, new Pillow raises."""
    from datasets.images import randaugment_transform

    tf = randaugment_transform(16, MEAN)
    flip, ra = tf.transforms
    assert type(flip).__name__ == "RandomHorizontalFlip" and type(ra).__name__ == "RandAugment"
    assert ra.num_layers == 2 and len(ra.ops) == 15 and all(op.magnitude == 9 for op in ra.ops)
    post = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    img = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    assert np.asarray(post.aug_fn(img, 0)).max() == 0
    assert np.asarray(post.aug_fn(img, 4)).max() == 192  # 200 & 0b11110000


def test_vtab_large_eval_split_native_storage_gives_the_same_pixels(vtab_root):
    """Eval splits over in_memory_max_mb may be cached at native resolution and resized per batch."""
    base = cfg_of("vtab/dtd", root=str(vtab_root), interpolation="bilinear")
    outs = []
    # 40x30 originals are smaller than 64x64 copies: auto picks native (nothing cached yet at 64, bilinear)
    for storage, expect in (("auto", "native"), ("native", "native"), ("resized", "64x64")):
        cfg = OmegaConf.merge(base, {"in_memory_max_mb": 0, "large_split_storage": storage})
        task = datasets.build(cfg, image_size=64, mean=MEAN, std=STD)
        outs.append(all_items(task.split("test")))
        assert task.info["cache"]["test"]["resolution"].startswith(expect), storage
        task.split("train")
        assert task.info["cache"]["train800"]["resolution"] == "64x64"  # training splits are always resized
    for x, y in outs[1:]:
        assert torch.equal(x, outs[0][0]) and torch.equal(y, outs[0][1])
    again = datasets.build(OmegaConf.merge(base, {"in_memory_max_mb": 0}), image_size=64, mean=MEAN, std=STD)
    again.split("test")
    assert again.info["cache"]["test"]["resolution"] == "64x64"  # auto reuses whichever cache exists
    reuse = datasets.build(OmegaConf.merge(base, {"in_memory_max_mb": 0}), image_size=16, mean=MEAN, std=STD)
    reuse.split("test")
    assert reuse.info["cache"]["test"]["resolution"] == "native, resized per batch"  # no decoding needed
    small = datasets.build(cfg_of("vtab/cifar100", root=str(vtab_root), in_memory_max_mb=0), image_size=16,
                           mean=MEAN, std=STD)
    small.split("test")
    assert small.info["cache"]["test"]["resolution"] == "16x16"  # 16x16 copies are smaller than 40x30 originals
    with pytest.raises(DataError, match="large_split_storage=big"):
        datasets.build(OmegaConf.merge(base, {"large_split_storage": "big"}), image_size=16, mean=MEAN, std=STD)
