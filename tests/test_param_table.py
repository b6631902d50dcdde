from tools.param_table import counts, render


def test_param_table_matches_mode_params(tmp_path):
    rows = counts("vit_b16", 100, ["lora", "bitfit", "vpt_shallow"])
    assert [(r["method"], r["trainable_params"], r["head_params"]) for r in rows] == [
        ("lora", 294_912, 76_900), ("bitfit", 102_912, 76_900), ("vpt_shallow", 76_800, 76_900)]
    text = render(rows, "vit_b16", 100)
    assert "| lora" in text and "294,912" in text


def test_undefined_method_is_listed():
    [row] = counts("convnext_micro", 10, ["vpt_shallow"])
    assert "not defined" in render([row], "convnext_micro", 10)
