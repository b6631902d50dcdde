"""Turns the suite's expected errors (bad names, paths, files) into one-line messages."""
from __future__ import annotations

import contextlib
import fnmatch
import re
import sys

from bench.imports import ShadowedPackageError
from bench.registry import UnknownEntryError


def _expected() -> tuple[type, ...]:
    base: tuple[type, ...] = (ShadowedPackageError, UnknownEntryError, FileNotFoundError, ValueError)
    try:  # the suite's own error types (skipped when its packages cannot be imported)
        from backbones.checkpoint import CheckpointError
        from backbones.sites import MethodNotDefinedError
        from datasets.base import DataError
    except ImportError:
        return base
    return base + (CheckpointError, MethodNotDefinedError, DataError)


class RunFailed(RuntimeError):
    """Training failed; the failed record is written (``record``). The CLI exits with status 3."""

    def __init__(self, message: str, record: dict):
        self.record = record
        super().__init__(message)

    def __reduce__(self):  # pickled back from joblib/submitit workers inside the failed JobReturn
        return type(self), (str(self), self.record)


class BadInput(RuntimeError):
    """A multirun job's config is wrong (nothing trained, no record): an ordinary exception, so that Hydra marks
    that job failed and goes on with the others (a ``SystemExit`` would end the sweep or kill a submitit job
    before its result is written)."""


EXIT_BAD_INPUT = 2     # a config key/value, file or folder is wrong: nothing was trained, no record
EXIT_RUN_FAILED = 3    # training failed (non-finite loss, out of memory, exception): a failed record was written
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: no record; the epoch checkpoint stays, the same command resumes


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def friendly_errors():
    """Expected errors become one ``error: ...`` line on stderr (its last line) and an exit status.

    In a multirun a failed training run (its record written) is re-raised, and a bad input becomes ``BadInput``:
    ordinary exceptions, so that Hydra goes on with the other jobs and the sweep still exits non-zero at the end."""
    try:
        yield
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        if _multirun():
            raise
        raise SystemExit(EXIT_RUN_FAILED) from None
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001
        if isinstance(e, (ShadowedPackageError, UnknownEntryError, FileNotFoundError, ValueError)) \
                or isinstance(e, _expected()):
            msg = " ".join(str(e).split("\n")) if isinstance(e, ValueError) else str(e)
            print(f"error: {msg}", file=sys.stderr)
            if _multirun():
                raise BadInput(msg) from None
            raise SystemExit(EXIT_BAD_INPUT) from None
        raise


GROUPS = ("method", "dataset", "backbone")


def group_options(group: str) -> list[str]:
    from bench import CONF_DIR

    root = CONF_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")
                  if not any(part.startswith("_") for part in p.relative_to(root).parts))


def check_group_overrides(argv: list[str]) -> str | None:
    """One-line message for ``method=NAME``/``dataset=``/``backbone=`` naming no config, else None.

    Sweeps (``a,b``) and Hydra's glob/choice syntax are checked per plain name.
    """
    import difflib

    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS or any(c in value for c in "()[]{}*$"):
            continue
        known = group_options(key)
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                return f"unknown {key} '{name}' (no conf/{key}/{name}.yaml).{hint} Known: {', '.join(known)}"
    return None


_GLOB = re.compile(r"^glob\((?P<inc>\[[^\]]*\]|[^,\[\]]+)(?:\s*,\s*exclude\s*=\s*(?P<exc>\[[^\]]*\]|[^,\[\]]+))?\)$")


def _patterns(text: str | None) -> list[str]:
    if not text:
        return []
    text = text.strip()
    if text.startswith("["):
        text = text[1:-1]
    return [t.strip() for t in text.split(",") if t.strip()]


def expand_group_globs(argv: list[str]) -> list[str]:
    """``dataset=glob(synthetic/*)`` → ``dataset=synthetic/clevr_count,...``: Hydra's own ``glob`` sees only
    the options directly in a group folder, not nested ones (``vtab/*``, ``synthetic/*``), so the runner
    expands globs over ``method``/``dataset``/``backbone`` itself (``exclude=`` as in Hydra)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        m = _GLOB.match(value.strip()) if sep and key.lstrip("+~") in GROUPS else None
        if not m:
            out.append(arg)
            continue
        known = group_options(key.lstrip("+~"))
        inc, exc = _patterns(m.group("inc")), _patterns(m.group("exc"))
        names = [n for n in known if any(fnmatch.fnmatchcase(n, p) for p in inc)
                 and not any(fnmatch.fnmatchcase(n, p) for p in exc)]
        if not names:
            raise SystemExit(f"error: {arg} matches no config in conf/{key.lstrip('+~')}/ (known: {', '.join(known)})")
        out.append(f"{key}={','.join(names)}")
    return out
