"""Shared fixtures and helpers: a tiny generated dataset, overrides that make the bundle configs fast,
tiny networks and generated blobs."""

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_dualssl.networks import DualNet
from monai_dualssl.synthetic import make_synthetic_dataset

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


# widths of a DualNet of a few thousand parameters that runs 32^3 volumes in milliseconds on a CPU
# (lists, so the dict also serves as bundle config overrides)
TINY_NET = {"n_filters": 4, "resnet_blocks": [1, 1, 1, 1], "vnet_stages": [1, 1, 1, 1, 1], "proj_dim": 8}


def tiny_dualnet(seed=0, **overrides) -> DualNet:
    """A :data:`TINY_NET` DualNet (``overrides`` change any constructor argument), with weights drawn
    after ``torch.manual_seed(seed)`` (``seed=None``: from the current random state)."""
    if seed is not None:
        torch.manual_seed(seed)
    return DualNet(**{**TINY_NET, **overrides})


def blob(shape: Sequence[int] = (12, 10, 8), seed: int = 0, kind: str = "smooth", threshold: float = 0.2) -> np.ndarray:
    """A binary blob of ``shape`` (bool array).

    ``kind="smooth"``: random, Gaussian-smoothed noise (sigma 1.5 voxels, from ``seed``) above ``threshold``
    standard deviations; it may touch the array border and have several components.
    ``kind="ball"``: the centred ellipsoid whose semi-axes are a quarter of the shape (``seed`` unused).
    """
    if kind == "ball":
        grid = np.indices(shape, dtype=np.float64)
        return sum(((g - (s - 1) / 2) / ((s - 1) / 2)) ** 2 for g, s in zip(grid, shape)) < 0.25
    if kind != "smooth":
        raise ValueError(f"unknown blob kind {kind!r}; expected 'smooth' or 'ball'.")
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma=1.5)
    return field > threshold * field.std()


def blob_image(shape: Sequence[int], seed: int = 0, contrast: float = 2.0, noise: float = 0.3):
    """``(image, mask)``: a float32 image of the ball :func:`blob` at intensity ``contrast`` on 0, plus
    Gaussian noise of standard deviation ``noise`` drawn from ``seed``, and that ball (bool)."""
    mask = blob(shape, kind="ball")
    rng = np.random.default_rng(seed)
    return (mask * contrast + rng.normal(0, noise, shape)).astype(np.float32), mask


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
        **TINY_NET,
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
        "num_threads": 1,  # as the autouse fixture: tiny convolutions are fastest on one thread, and runs compare bit for bit
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


def pytest_configure(config):
    config.addinivalue_line("markers", "last: runs after every other test (checks what the whole run left behind)")


def pytest_collection_modifyitems(items):
    """Tests marked ``last`` (test_package.py: the package folder is unchanged) run after all the others."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


# ---- ACDC (tests/test_acdc.py, tests/test_multiclass.py) --------------------------------------------


def acdc_dir() -> Path:
    """The real ACDC folder in the field's h5 layout (``ACDC_DIR``, else acdc.yaml's default ``bundle/data/acdc``)."""
    return Path(os.environ.get("ACDC_DIR", REPO / "bundle" / "data" / "acdc"))


def require_acdc() -> Path:
    """The ACDC folder; skips when it is missing (ACDC is not part of the CI data)."""
    root = acdc_dir()
    if not all((root / f).is_file() for f in ("train.list", "val.list", "test.list")) or not (root / "data").is_dir():
        pytest.skip(f"real ACDC data not found at {root} (set ACDC_DIR)")
    return root


def heart_label(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A 4-class ACDC-like label ``(slices, H, W)`` (uint8): per slice a left-ventricle disk (3) inside a
    myocardium ring (2), a right-ventricle crescent (1) beside it; centre and radii vary with ``seed``, the
    structures shrink toward the last slices (the apex), the first and last slices are empty."""
    rng = np.random.default_rng(seed)
    slices, h, w = shape
    cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
    r_lv = min(h, w) / 8 * rng.uniform(0.9, 1.1)
    y, x = np.indices((h, w))
    label = np.zeros(shape, np.uint8)
    for s in range(1, slices - 1):
        scale = 1.0 - 0.5 * s / slices
        d = np.hypot(y - cy, x - cx)
        rv = np.hypot(y - cy, x - (cx - 1.9 * r_lv * scale))
        label[s][(rv < 1.3 * r_lv * scale) & (d >= 1.5 * r_lv * scale)] = 1
        label[s][d < 1.5 * r_lv * scale] = 2
        label[s][d < r_lv * scale] = 3
    return label


def heart_image(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """An image for :func:`heart_label`: bright blood pools (1, 3), dark myocardium (2), noise; float32
    min-max normalised to [0, 1] per volume as the field's h5 files are."""
    rng = np.random.default_rng(seed)
    image = np.choose(label, [0.3, 0.9, 0.1, 1.0]) + rng.normal(0, 0.05, label.shape)
    return ((image - image.min()) / (image.max() - image.min())).astype(np.float32)


def write_fake_acdc(
    root: Path,
    train: Sequence[str] = ("p1_frame01", "p1_frame02", "p2_frame01", "p2_frame02", "p3_frame01", "p3_frame02"),
    val: Sequence[str] = ("p4_frame01", "p4_frame02"),
    test: Sequence[str] = ("p5_frame01", "p5_frame02"),
    shape: Sequence[int] = (40, 36),
    slices: Sequence[int] = (12, 6, 11, 7, 8, 9, 10, 6, 9, 7),
    seed: int = 0,
) -> Path:
    """An ACDC folder of the field's h5 layout with generated hearts (:func:`heart_label`): ``train.list``,
    ``val.list``, ``test.list``; ``data/<id>_slice_<N>.h5`` (N from 1) for the train cases, written in a
    shuffled order, and whole volumes ``data/<id>.h5`` ``(slices, H, W)`` for the others. Case ``i`` has
    ``slices[i]`` slices (ids in train, val, test order)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    import h5py

    for i, case in enumerate([*train, *val, *test]):
        label = heart_label((slices[i % len(slices)], *shape), seed=seed + i)
        image = heart_image(label, seed=seed + i)
        if case in train:
            for n in rng.permutation(len(label)):
                with h5py.File(data / f"{case}_slice_{n + 1}.h5", "w") as f:
                    f["image"], f["label"] = image[n], label[n]
        else:
            with h5py.File(data / f"{case}.h5", "w") as f:
                f["image"], f["label"] = image, label
    for name, ids in (("train.list", train), ("val.list", val), ("test.list", test)):
        (root / name).write_text("".join(f"{i}\n" for i in ids))
    return root


def save_on_gpu(obj, path):
    """``torch.save`` as on a CUDA machine: every tensor's storage is tagged ``cuda:0`` (no GPU needed)."""
    import torch.serialization

    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.location_tag = real
