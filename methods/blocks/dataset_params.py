"""Official per-dataset hyper-parameters shipped as data (``methods/data/*.yaml``).

A method run with ``per_dataset=true`` takes its size/scale keys for the run's dataset from
``methods/data/per_dataset_vtab.yaml`` (the dataset is the runner's ``method.context['dataset']``;
its last path component is the key, e.g. ``vtab/cifar100`` -> ``cifar100``).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import yaml

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
PER_DATASET_FILE = DATA_DIR / "per_dataset_vtab.yaml"


@functools.lru_cache(maxsize=None)
def load_data(name: str) -> dict:
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"method data file {path} is missing (it ships with the repository under methods/data/)")
    with open(path) as f:
        return yaml.safe_load(f)


def dataset_key(dataset: Optional[str]) -> Optional[str]:
    return None if not dataset else str(dataset).rstrip("/").split("/")[-1]


def per_dataset_overrides(method: str, dataset: Optional[str]) -> dict[str, Any]:
    """The official values of ``method`` for ``dataset``; a one-line error when there are none."""
    table = load_data(PER_DATASET_FILE.name).get(method)
    if table is None:
        raise ValueError(f"method '{method}' has no per-dataset table in {PER_DATASET_FILE}; set method.per_dataset=false")
    key = dataset_key(dataset)
    if key is None:
        raise ValueError(f"method.per_dataset=true needs the run's dataset (build through bench.run); "
                         f"or set method.per_dataset=false")
    if key not in table["datasets"]:
        raise ValueError(f"method.per_dataset=true: no official {method} values for dataset '{key}' in "
                         f"{PER_DATASET_FILE.name} (known: {', '.join(sorted(table['datasets']))}); "
                         f"set method.per_dataset=false and give the values explicitly")
    return dict(table["datasets"][key])


def resolved_cfg(method) -> dict[str, Any]:
    """``method.cfg`` with the per-dataset overrides applied when ``per_dataset`` is true."""
    cfg = dict(method.cfg)
    if cfg.get("per_dataset"):
        cfg.update(per_dataset_overrides(method.name, method.context.get("dataset")))
    return cfg
