"""The synthetic demo dataset: the bundle's default dataset, generated on first use.

- :func:`make_synthetic_dataset`: LGE-MRI-like volumes with a left-atrium-like label, as an MSD folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["make_synthetic_dataset"]

SYNTHETIC_NAME = "SyntheticAtrium"  # the "name" of the synthetic dataset's dataset.json: its own-output marker
SYNTHETIC_SUBDIRS = ("imagesTr", "labelsTr")
SYNTHETIC_CASE = re.compile(r"case_\d{3,}\.nii\.gz")


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], wavelength: float) -> np.ndarray:
    """Zero-mean, unit-std random field smooth on the scale of ``wavelength`` voxels (truncated DCT)."""
    bases, freqs = [], []
    for n in shape:
        k = np.arange(min(n, 1 + int(6 * n / wavelength)))
        bases.append(np.cos(np.pi * np.outer(np.arange(n) + 0.5, k) / n).astype(np.float32))
        freqs.append(k / (2.0 * n))
    f2 = freqs[0][:, None, None] ** 2 + freqs[1][None, :, None] ** 2 + freqs[2][None, None, :] ** 2
    coef = (rng.standard_normal(f2.shape) * np.exp(-0.5 * f2 * wavelength**2)).astype(np.float32)
    coef[0, 0, 0] = 0.0
    field = np.einsum("abc,xa,yb,zc->xyz", coef, *bases, optimize=True)
    return field / max(float(field.std()), 1e-6)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """``(x - c)^T R diag(r^-2) R^T (x - c)`` on the grid: below 1 inside the ellipsoid."""
    a = (rotation @ np.diag(radii**-2.0) @ rotation.T).tolist()
    d = [g - float(c) for g, c in zip(grid, centre)]
    return sum(a[i][j] * (1 if i == j else 2) * d[i] * d[j] for i in range(3) for j in range(i, 3))


def _draw_tube(mask: np.ndarray, points: np.ndarray, radii: np.ndarray) -> None:
    """Set the union of balls ``radii[i]`` around ``points[i]`` (a tube for dense points) in ``mask``."""
    reach = int(np.ceil(radii.max()))
    steps = np.arange(-reach, reach + 1, dtype=np.int32)
    offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    voxels = np.floor(points).astype(np.int32)[:, None, :] + offsets
    inside = ((voxels - points[:, None, :].astype(np.float32)) ** 2).sum(-1) <= radii[:, None] ** 2
    inside &= ((voxels >= 0) & (voxels < np.asarray(mask.shape))).all(-1)
    mask[tuple(voxels[inside].T)] = True


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Points of the quadratic Bezier curve ``p0 -> p2`` (control ``p1``), at most one voxel apart."""
    t = np.linspace(0.0, 1.0, int(np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)) + 2)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _atrium(rng: np.random.Generator, grid: list[np.ndarray], dims: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Atrium mask (a main ellipsoid and 1-2 merged lobes, boundary deformed by low-frequency
    noise) and the main ellipsoid's ``(centre, radii, rotation)``."""
    centre, radii, rotation = dims * rng.uniform(0.42, 0.58, 3), dims * rng.uniform(0.2, 0.27, 3), _random_rotation(rng)
    level = _ellipsoid(grid, centre, radii, rotation)
    for _ in range(rng.integers(1, 3)):
        lobe = centre + rotation @ (radii * rng.uniform(-0.6, 0.6, 3))
        level = np.minimum(level, _ellipsoid(grid, lobe, radii * rng.uniform(0.5, 0.8, 3), _random_rotation(rng)))
    shape = tuple(int(n) for n in dims)
    return level + 0.25 * _smooth_field(rng, shape, dims.min() / 4) < 1.0, (centre, radii, rotation)


def _vessels(rng: np.random.Generator, dims: np.ndarray, centre, radii, rotation) -> np.ndarray:
    """Mask of 3-5 pulmonary veins (curved tubes from inside the atrium outwards) and a descending
    aorta (a thick tube along z beside the atrium)."""
    shape_matrix = rotation @ np.diag(radii**-2.0) @ rotation.T
    mask = np.zeros(tuple(int(n) for n in dims), bool)
    for _ in range(rng.integers(3, 6)):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        surface = 1.0 / np.sqrt(u @ shape_matrix @ u)
        p0, p2 = centre + 0.6 * surface * u, centre + (surface + rng.uniform(0.25, 0.45) * dims.min()) * u
        points = _bezier(p0, (p0 + p2) / 2 + rng.normal(0.0, 0.15 * np.linalg.norm(p2 - p0), 3), p2)
        _draw_tube(mask, points, np.linspace(1.0, 0.7, len(points)) * rng.uniform(2.0, 3.5))
    angle, gap = rng.uniform(0, 2 * np.pi), radii.max() + rng.uniform(8.0, 14.0)
    xy = np.clip(centre[:2] + gap * np.array([np.cos(angle), np.sin(angle)]), 7.0, dims[:2] - 8.0)
    z = np.arange(-4.0, dims[2] + 4.0)
    wobble = rng.uniform(-4.0, 4.0, 2) * np.sin(np.pi * z / dims[2])[:, None]
    _draw_tube(mask, np.column_stack([xy + wobble, z]), np.full(len(z), rng.uniform(4.0, 6.0)))
    return mask


def _synthetic_case(rng: np.random.Generator, base_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (image, label) pair; see :func:`make_synthetic_dataset` for the model."""
    shape = tuple(int(round(s * f)) for s, f in zip(base_shape, rng.uniform(0.85, 1.15, 3)))
    dims = np.asarray(shape, float)
    atrium, ellipsoid = _atrium(rng, [g.astype(np.float32) for g in np.ogrid[tuple(slice(0, n) for n in shape)]], dims)
    blood = atrium | _vessels(rng, dims, *ellipsoid)
    # textured tissue with large dark/bright regions, bright blood, partial-volume blur,
    # multiplicative bias field, Gaussian noise, z-scoring
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    texture /= texture.std()
    tissue = 1.0 + 0.15 * texture + 0.25 * np.tanh(_smooth_field(rng, shape, dims.min() / 6))
    image = ndimage.gaussian_filter(np.where(blood, 1.0 + rng.uniform(0.8, 1.1) + 0.05 * texture, tissue), 0.7)
    image *= np.exp(0.25 * _smooth_field(rng, shape, dims.max() / 2))
    image += rng.uniform(0.2, 0.3) * rng.standard_normal(shape, dtype=np.float32)
    return ((image - image.mean()) / image.std()).astype(np.float32), atrium.astype(np.uint8)


def _save_nifti(array: np.ndarray, path: Path, dtype) -> None:
    """Save ``array`` with a 1 mm identity affine, stored as ``dtype`` (int16 images get ``scl_slope``
    as scanners store MRI)."""
    nifti = nib.Nifti1Image(array, np.eye(4))
    nifti.set_data_dtype(dtype)
    nifti.header.set_xyzt_units("mm")
    nib.save(nifti, path)


def _msd_item(name: str, labeled: bool = True) -> dict:
    return {"image": f"./imagesTr/{name}", **({"label": f"./labelsTr/{name}"} if labeled else {})}


def _is_synthetic_json(path: Path) -> bool:
    """True when ``path`` is a ``dataset.json`` written by :func:`make_synthetic_dataset` (its name marker)."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(spec, dict) and spec.get("name") == SYNTHETIC_NAME


def _foreign_entries(root: Path) -> list[str]:
    """What in ``root`` is not :func:`make_synthetic_dataset`'s own output: anything at all when ``root``
    has no ``dataset.json`` of the generator, else anything but that file and the case files of
    ``imagesTr/`` and ``labelsTr/`` (empty: ``root`` is missing, empty or the generator's own)."""
    if not root.is_dir():
        return [f"{root.name} (not a folder)"] if root.exists() else []
    own = _is_synthetic_json(root / "dataset.json")
    found = []
    for entry in sorted(root.iterdir()):
        if own and entry.name in SYNTHETIC_SUBDIRS and entry.is_dir():
            found += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir()) if not SYNTHETIC_CASE.fullmatch(f.name)]
        elif not (own and entry.name == "dataset.json"):
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def make_synthetic_dataset(
    root: str | os.PathLike,
    num_cases: int = 24,
    num_labeled: int = 6,
    num_val: int = 6,
    shape: Sequence[int] = (96, 96, 64),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """
    Generate the bundle's default dataset: ``num_cases`` synthetic LGE-MRI-like volumes with a
    left-atrium-like label, as an MSD folder (``imagesTr/case_XXX.nii.gz``,
    ``labelsTr/case_XXX.nii.gz`` for every case, 1 mm isotropic) and a ``dataset.json`` listing
    the first ``num_labeled`` cases under ``training``, the next ones (image only) under
    ``unlabeled`` and the last ``num_val`` under ``validation``.

    Each volume (shape ``shape`` scaled by 0.85-1.15 per axis): the atrium (label 1) is an
    ellipsoid merged with 1-2 lobes, randomly sized, placed and rotated, its boundary deformed
    by low-frequency noise; 3-5 curved pulmonary veins leave it and a thick descending aorta
    runs along z beside it, all with the atrium's intensity but label 0 (as in the LA
    challenge labels), so a threshold cannot segment it. Tissue texture with large dark/bright
    regions, partial-volume blur, a smooth multiplicative bias field (about +-25 %), Gaussian
    noise, then z-scoring per volume. Case ``i`` depends only on ``(seed, i)``.

    The generator writes only into a missing or empty folder, or over its own earlier output
    (recognised by its ``dataset.json``, whose ``name`` is ``"SyntheticAtrium"``, beside
    ``imagesTr/`` and ``labelsTr/`` holding only ``case_XXX.nii.gz`` files); any other file in
    ``root`` (a ``train.list``, h5 or NIfTI files, a foreign ``dataset.json``, ...) makes it refuse
    without writing anything, with or without ``overwrite``. Its own earlier output is reused as is
    (unless ``overwrite``). Cases are written to a temporary folder beside ``root`` and moved in,
    ``dataset.json`` last, so an interrupted run never leaves a dataset that looks complete. Call
    it from one process (e.g. rank 0).

    Args:
        root: dataset folder.
        num_cases: number of volumes.
        num_labeled: cases listed with labels under ``training``.
        num_val: cases listed under ``validation``.
        shape: mean volume shape (x, y, z), each at least 32.
        seed: generator seed.
        overwrite: regenerate the generator's own earlier output (never anything else).

    Returns:
        the path of ``root/dataset.json``.

    Raises:
        ValueError: bad counts or shape.
        FileExistsError: ``root`` holds anything but the generator's own output (the message names
            the folder and lists what it found); nothing is written.
    """
    root = Path(root)
    target = root / "dataset.json"
    foreign = _foreign_entries(root)
    if foreign:
        listed = ", ".join(foreign[:10]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 10 else "")
        mark = "" if _is_synthetic_json(target) else "; it has no dataset.json written by the generator"
        raise FileExistsError(
            f"{root}: refusing to write the synthetic demo dataset into this folder: it holds files that are "
            f"not the generator's own output ({listed}){mark}. The generator only writes into a missing or "
            "empty folder or over its own earlier output; nothing was written. Point dataset_dir at another "
            "folder, or set synthetic to false to train on this folder's data."
        )
    if target.is_file() and not overwrite:
        return target
    if num_labeled < 1 or num_val < 0 or num_labeled + num_val > num_cases:
        raise ValueError(
            f"need 1 <= num_labeled and num_labeled ({num_labeled}) + num_val ({num_val}) <= num_cases ({num_cases})."
        )
    if len(shape) != 3 or min(shape) < 32:
        raise ValueError(f"shape must be 3 sizes of at least 32 voxels, found {tuple(shape)}.")
    names = [f"case_{i:03d}.nii.gz" for i in range(num_cases)]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for d in SYNTHETIC_SUBDIRS:
            (tmp / d).mkdir()
        with ThreadPoolExecutor(max_workers=1) as writer:  # gzip in a thread while the next case is drawn
            saved = []
            for i, name in enumerate(names):
                image, label = _synthetic_case(np.random.default_rng([seed, i]), shape)
                saved.append(writer.submit(_save_nifti, image, tmp / "imagesTr" / name, np.int16))
                saved.append(writer.submit(_save_nifti, label, tmp / "labelsTr" / name, np.uint8))
            for future in saved:
                future.result()
        spec = {
            "name": SYNTHETIC_NAME,
            "description": f"synthetic LGE-MRI-like left atrium volumes (seed {seed}, mean shape {list(shape)})",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "atrium"},
            "numTraining": num_labeled,
            "training": [_msd_item(n) for n in names[:num_labeled]],
            "unlabeled": [_msd_item(n, labeled=False) for n in names[num_labeled : num_cases - num_val]],
            "validation": [_msd_item(n) for n in names[num_cases - num_val :]],
        }
        (tmp / "dataset.json").write_text(json.dumps(spec, indent=2))
        root.mkdir(exist_ok=True)
        target.unlink(missing_ok=True)
        for d in SYNTHETIC_SUBDIRS:
            shutil.rmtree(root / d, ignore_errors=True)
            os.replace(tmp / d, root / d)
        os.replace(tmp / "dataset.json", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
