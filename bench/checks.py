"""Strict configs and pre-flight checks: every mistake fails loudly, in one line, before work starts.

Valid keys come from the yaml files themselves, never from a list in code: the top level, ``train``,
``eval`` and ``results`` from ``conf/config.yaml``; ``method.*`` from ``conf/method/<name>.yaml``,
``dataset.*`` from ``conf/dataset/<name>.yaml``, ``backbone.*`` from ``conf/backbone/<name>.yaml`` (nested
mappings such as ``dataset.sizes`` or ``backbone.method_defaults`` are checked key by key; a key whose yaml
value is null or a scalar may hold anything). So a new config file needs no change here. Recipes are
checked like the command line: they may only set keys that exist.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

GROUPS = ("method", "dataset", "backbone")
OPEN_TOP = ("recipe", "hydra")  # recipe: set by recipe files (source, notes); hydra: Hydra's own tree


class ConfigError(ValueError):
    """A config key or value is wrong; the message is one line naming the key."""


class ResumeError(ConfigError):
    """The run folder's checkpoint cannot be continued with this config/code."""


@lru_cache(maxsize=None)
def _yaml_tree(path: str) -> Optional[dict]:
    p = Path(path)
    if not p.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(p), resolve=False)


def top_tree() -> dict:
    from bench import CONF_DIR

    tree = dict(_yaml_tree(str(CONF_DIR / "config.yaml")))
    tree.pop("defaults", None)
    for g in GROUPS:
        tree.setdefault(g, {})
    return tree


def group_tree(group: str, name: str) -> Optional[dict]:
    from bench import CONF_DIR

    return _yaml_tree(str(CONF_DIR / group / f"{name}.yaml"))


def default_choice(group: str) -> Optional[str]:
    from bench import CONF_DIR

    for d in _yaml_tree(str(CONF_DIR / "config.yaml")).get("defaults", []):
        if isinstance(d, dict) and group in d:
            return str(d[group])
    return None


def _nearest(key: str, known: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.0)
    return close[0] if close else None


def unknown_key_message(path: list[str], known: Iterable[str], where: str) -> str:
    known = sorted(known)
    near = _nearest(path[-1], known)
    prefix = ".".join(path[:-1])
    hint = f" Did you mean '{prefix + '.' if prefix else ''}{near}'?" if near else ""
    return f"unknown config key '{'.'.join(path)}' (not in {where}).{hint}"


def find_unknown(node: Any, allowed: Any, path: list[str], where: str) -> Optional[str]:
    """First key of ``node`` missing from ``allowed`` (recursively through mappings both sides have)."""
    if not isinstance(node, dict) or not isinstance(allowed, dict):
        return None
    for k in node:
        if k not in allowed:
            return unknown_key_message(path + [str(k)], allowed, where)
        msg = find_unknown(node[k], allowed[k], path + [str(k)], where)
        if msg:
            return msg
    return None


def check_keys(cfg: DictConfig) -> None:
    """Reject any key of the composed config that no yaml defines (raises ``ConfigError``)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    top = top_tree()
    for k in raw:
        if k not in top and k not in OPEN_TOP:
            raise ConfigError(unknown_key_message([str(k)], list(top) + list(OPEN_TOP), "conf/config.yaml"))
    for k, v in raw.items():
        if k in GROUPS or k in OPEN_TOP:
            continue
        msg = find_unknown(v, top[k], [k], "conf/config.yaml")
        if msg:
            raise ConfigError(msg)
    for g in GROUPS:
        node = raw.get(g)
        name = node.get("name") if isinstance(node, dict) else None
        allowed = group_tree(g, str(name)) if name else None
        if allowed is None:  # renamed entry (``method.name=x``): the registry reports it
            continue
        msg = find_unknown(node, allowed, [g], f"conf/{g}/{name}.yaml")
        if msg:
            raise ConfigError(msg)


def check_override_keys(argv: list[str]) -> Optional[str]:
    """The same check on command-line overrides before Hydra composes (Hydra's own error is several
    lines and names no alternative). Returns one line, or None."""
    choices: dict[str, list[str]] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in GROUPS and not any(c in value for c in "()[]{}*$"):
            choices[key.lstrip("+~")] = [v.strip() for v in value.split(",") if v.strip()]
    top = top_tree()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        parts = key.split(".")
        if "/" in key or key.startswith("hydra") or parts[0] in OPEN_TOP or (parts[0] in GROUPS and len(parts) == 1):
            continue
        if parts[0] in GROUPS:
            names = choices.get(parts[0]) or [default_choice(parts[0])]
            for name in names:
                tree = group_tree(parts[0], str(name))
                if tree is None:
                    continue  # unknown option: reported by check_group_overrides
                msg = _path_missing(parts, {parts[0]: tree}, f"conf/{parts[0]}/{name}.yaml")
                if msg:
                    return msg
        else:
            msg = _path_missing(parts, top, "conf/config.yaml")
            if msg:
                return msg
    return None


def _path_missing(parts: list[str], tree: Any, where: str) -> Optional[str]:
    node = tree
    for i, p in enumerate(parts):
        if not isinstance(node, dict):
            return None  # below a scalar/null: open
        if p not in node:
            return unknown_key_message(parts[: i + 1], node, where)
        node = node[p]
    return None


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------
def _num(cfg, dotted: str):
    v = OmegaConf.select(cfg, dotted, default=None)
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def check_values(cfg: DictConfig) -> None:
    """Out-of-range values fail before any data is read, naming the key."""
    rules = [
        ("train.lr", lambda x: x > 0, "must be > 0"),
        ("train.epochs", lambda x: x >= 1 and x == int(x), "must be an integer >= 1"),
        ("train.batch_size", lambda x: x >= 1 and x == int(x), "must be an integer >= 1"),
        ("eval.batch_size", lambda x: x >= 1, "must be >= 1"),
        ("eval.every", lambda x: x >= 1, "must be >= 1"),
        ("train.weight_decay", lambda x: x >= 0, "must be >= 0"),
        ("train.warmup_epochs", lambda x: x >= 0, "must be >= 0"),
        ("train.label_smoothing", lambda x: 0 <= x < 1, "must be in [0, 1)"),
        ("train.drop_path", lambda x: 0 <= x < 1, "must be in [0, 1)"),
        ("method.rank", lambda x: x >= 1 and x == int(x), "must be an integer >= 1"),
        ("method.sparsity", lambda x: 0 <= x < 1, "must be in [0, 1)"),
    ]
    for key, ok, why in rules:
        raw = OmegaConf.select(cfg, key, default=None)
        x = _num(cfg, key)
        if raw is None:
            continue
        if x is None:
            if key == "method.sparsity" and str(raw) == "auto":
                continue
            raise ConfigError(f"{key}={raw} is not a number ({why})")
        if not ok(x):
            raise ConfigError(f"{key}={raw} is out of range: {why}")
    if OmegaConf.select(cfg, "method.budget", default=None) is not None:
        b = OmegaConf.select(cfg, "method.budget")
        x = _num(cfg, "method.budget")
        if x is not None and x <= 0:
            raise ConfigError(f"method.budget={b} is out of range: must be > 0 (e.g. 0.4M)")
    resume = str(cfg.get("resume", "auto"))
    if resume not in ("auto", "never", "False", "false"):
        raise ConfigError(f"resume={resume}: choose auto or never")


def check_budget(method) -> None:
    """After a meta-device build: a budget above what the method can train on this backbone."""
    info = getattr(method, "info", None) or {}
    if info.get("budget_clamped"):
        can = info.get("trainable_excl_head")
        raise ConfigError(f"method.budget={method.get('budget')} is impossible: {method.name} can train at most "
                          f"{can:,} parameters on this backbone; set method.budget below that")


# ----------------------------------------------------------------------------------------------
# pre-flight: files and folders, before the model is built or data decoded
# ----------------------------------------------------------------------------------------------
def check_results_dir(results_dir: str) -> None:
    runs = Path(results_dir) / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=runs, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"results.dir={results_dir} is not writable ({e.strerror or e}: {runs}); make it writable "
                          f"or choose another folder with results.dir=DIR") from None


def check_checkpoint_file(cfg: DictConfig) -> None:
    ck = OmegaConf.select(cfg, "backbone.checkpoint", default=None)
    if ck is None or str(ck) == "":
        return
    p = Path(str(ck)).expanduser()
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"backbone.checkpoint={ck} {what}: download the file named in the README's "
                                f"backbone table, or set backbone.checkpoint=null for a random init")


def check_data_root(cfg: DictConfig) -> None:
    """A set ``dataset.root`` that does not exist (procedural sets, whose yaml has ``data_seed``, create theirs)."""
    root = OmegaConf.select(cfg, "dataset.root", default=None)
    if root is None or str(root) == "" or OmegaConf.select(cfg, "dataset.data_seed", default=None) is not None:
        return
    p = Path(str(root)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset.root={root} does not exist: download the data (README \"Getting the "
                                f"data\") and set dataset.root=/path/to/it")


def preflight(cfg: DictConfig) -> None:
    check_results_dir(str(cfg.results.dir))
    check_checkpoint_file(cfg)
    check_data_root(cfg)
