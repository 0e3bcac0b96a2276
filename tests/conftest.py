"""Shared fixtures: a tiny generated dataset and overrides that make the bundle configs fast."""

import os
from pathlib import Path

import pytest
import torch

from monai_dualssl.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def la_dir() -> Path:
    """The real Left Atrium folder (``LA2018_DIR`` or ``shared/data/la2018`` beside the repository)."""
    return Path(os.environ.get("LA2018_DIR", REPO.parent / "shared" / "data" / "la2018"))


def require_la() -> Path:
    """The LA folder; a missing folder fails under CI and skips elsewhere."""
    root = la_dir()
    if not (root / "train.list").is_file():
        message = f"real LA data not found at {root} (set LA2018_DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """6 synthetic cases of about 32^3 (2 labeled, 2 unlabeled, 2 validation), MSD layout."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    make_synthetic_dataset(root, num_cases=6, num_labeled=2, num_val=2, shape=(32, 32, 32), seed=3)
    return root


def tiny_overrides(dataset: Path, bundle_root: Path, **extra) -> dict:
    """Config overrides for a few-second run of train.yaml on ``dataset``, writing under ``bundle_root``."""
    overrides = {
        "bundle_root": str(bundle_root),
        "model_dir": str(bundle_root / "models"),
        "synthetic": False,
        "dataset_dir": str(dataset),
        "patch_size": [32, 32, 16],
        "n_filters": 4,
        "resnet_blocks": [1, 1, 1, 1],
        "vnet_stages": [1, 1, 1, 1, 1],
        "proj_dim": 8,
        "batch_labeled": 1,
        "batch_unlabeled": 1,
        "max_iterations": 4,
        "epoch_length": 2,
        "val_interval": 2,
        "log_interval": 1,
        "rampup_iterations": 2,
        "num_workers": 0,
        "device": "$torch.device('cpu')",
        "amp": False,
    }
    overrides.update(extra)
    return overrides


@pytest.fixture(autouse=True)
def _few_threads():
    """Tiny 3-D convolutions run faster on one thread than contending for two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
