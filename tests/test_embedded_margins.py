"""tools.embedded_margins: the margin check, and the three arms run end to end through the runner."""
from tools import embedded_margins as em


def test_check_needs_margin_above_the_larger_std():
    arms = [a for a, _ in em.ARMS]
    ok = {arms[0]: [6.0, 7.0, 8.0], arms[1]: [20.0, 21.0, 22.0], arms[2]: [60.0, 61.0, 62.0]}
    assert [r["holds"] for r in em.check(ok)] == [True, True]
    close = dict(ok)
    close[arms[1]] = [7.0, 9.0, 11.0]  # margin 2.0 over random init, std 2.0: does not hold
    rows = em.check(close)
    assert rows[0]["margin"] == 2.0 and rows[0]["std"] == 2.0 and not rows[0]["holds"]


def test_three_arms_end_to_end(tmp_path):
    out = tmp_path / "margins.md"
    tiny = ["train.epochs=1", "dataset.sizes.train=64", "dataset.sizes.val=16", "dataset.sizes.test=64"]
    rc = em.main(["--seeds", "0,1", "--out", str(out), "--records", str(tmp_path / "runs"),
                  *[x for o in tiny for x in ("--set", o)]])
    text = out.read_text()
    assert rc in (0, 1)  # one epoch on 64 images decides nothing; the table must still be complete
    assert "| linear, random init |" in text and "| lora, pretrained |" in text and "(16 classes, 64 train / 64 test)" in text
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 6


def test_video_arms_compare_lora_on_pretrained_and_random_and_with_chance():
    em.use_task("video")
    try:
        arms = [a for a, _ in em.ARMS]
        assert arms == ["lora, random init", "lora, pretrained"]
        rows = em.check({arms[0]: [20.0, 22.0, 24.0], arms[1]: [50.0, 52.0, 54.0]}, chance=12.5)
        assert [r["worse"] for r in rows] == ["chance (12.50 %)", "lora, random init"]
        assert rows[0]["margin"] == 52.0 - 12.5 and rows[0]["std"] == 2.0 and all(r["holds"] for r in rows)
        text = em.render({arms[0]: [20.0], arms[1]: [50.0]}, [0], [], 60.0, "8 classes", "video", 12.5, [50.0])
        assert "`synthetic/moving_dsprites`" in text and "--task video" in text and "50.0-50.0 s" in text
    finally:
        em.use_task("image")


def test_dense_arms_pretrained_vs_random_for_linear_and_lora():
    em.use_task("dense")
    try:
        arms = [a for a, _ in em.ARMS]
        assert arms == ["linear, random init", "linear, pretrained", "lora, random init", "lora, pretrained"]
        assert all(set(em.DENSE_TRAIN) <= set(over) for _, over in em.ARMS)  # one schedule for every arm
        rows = em.check({arms[0]: [5.0, 6.0, 7.0], arms[1]: [10.0, 11.0, 12.0], arms[2]: [5.0, 8.0, 11.0],
                         arms[3]: [9.0, 10.0, 11.0]})
        assert [(r["better"], r["worse"]) for r in rows] == [(arms[1], arms[0]), (arms[3], arms[2])]
        assert rows[0]["holds"] and rows[1]["margin"] == 2.0 and rows[1]["std"] == 3.0 and not rows[1]["holds"]
        text = em.render({a: [1.0] for a in arms}, [0], [], 60.0, "4 classes", "dense", None, [40.0],
                         "synthetic/shapes_seg", "mIoU")
        assert "## `synthetic/shapes_seg` (mIoU)" in text and "--task dense" in text and "margin (mIoU points)" in text
    finally:
        em.use_task("image")
