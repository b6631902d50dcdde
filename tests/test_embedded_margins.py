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
