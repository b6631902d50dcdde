"""Build hooks for petl-bench.

The top-level packages ``methods``, ``datasets`` and ``backbones`` have generic names (``datasets`` is
also the Hugging Face package). A regular (non-editable) wheel would write them into site-packages,
where they could overwrite another distribution's files. petl-bench is therefore installed in
editable mode only (``pip install -e .``): building a regular wheel stops with a one-line error.
"""
from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel

REFUSAL = (
    "petl-bench installs in editable mode only: run `pip install -e .` from the repository. "
    "A regular wheel would put its top-level packages `methods`, `datasets` and `backbones` into "
    "site-packages, where they could overwrite other distributions (e.g. Hugging Face `datasets`)."
)


class EditableOnlyWheel(bdist_wheel):
    """Refuses to build a regular wheel (editable installs do not go through bdist_wheel)."""

    def run(self):
        raise SystemExit(REFUSAL)


setup(cmdclass={"bdist_wheel": EditableOnlyWheel})
