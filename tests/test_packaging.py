"""Generic top-level names: shadowing is detected, and no regular wheel can overwrite other distributions."""
import subprocess
import sys
import textwrap

import pytest

from bench import ROOT
from bench.imports import ShadowedPackageError, check_package


def test_shadowed_datasets_package_is_reported(tmp_path):
    fake = tmp_path / "datasets"
    fake.mkdir()
    (fake / "__init__.py").write_text("HF = True\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import datasets            # someone else's 'datasets' is imported first
        sys.path.remove({str(tmp_path)!r})
        from bench.imports import import_suite
        import_suite()
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ShadowedPackageError" in out.stderr and "package 'datasets' was imported from" in out.stderr
    assert str(ROOT / "datasets") in out.stderr


def test_check_package_accepts_ours():
    import datasets

    check_package("datasets")
    assert str(ROOT) in datasets.__file__


def test_check_package_rejects_foreign_module(monkeypatch):
    import types

    fake = types.ModuleType("backbones")
    fake.__file__ = "/elsewhere/backbones/__init__.py"
    monkeypatch.setitem(sys.modules, "backbones", fake)
    with pytest.raises(ShadowedPackageError, match="/elsewhere/backbones"):
        check_package("backbones")


def test_regular_wheel_build_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "-d", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "installs in editable mode only" in out.stderr + out.stdout
    assert not list(tmp_path.glob("*.whl"))
