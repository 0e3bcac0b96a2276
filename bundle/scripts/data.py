"""Data side of the bundle: an h5 reader, datalist builders, a synthetic dataset and a preflight check.

- :class:`H5Reader`: MONAI :class:`~monai.data.ImageReader` for the field's ``mri_norm2.h5`` files
  (one h5 dataset per reader: ``H5Reader(dataset="image")`` / ``H5Reader(dataset="label")``).
- :func:`la_datalist`, :func:`msd_datalist`, :func:`folder_datalist` and the dispatching
  :func:`build_datalist`: ``{"labeled": [...], "unlabeled": [...], "validation": [...]}`` of
  MONAI item dicts, the three splits checked to be disjoint.
- :func:`make_synthetic_dataset`: the bundle's default dataset, generated on first use.
- :func:`preflight`: loads every case once and reports every problem before training starts.
- :func:`check_inputs` / :func:`raise_failed_inputs`: the same checks for inference's images; the
  unusable ones are skipped, then named.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from monai.data import ImageReader, MetaTensor
from monai.transforms import LoadImage
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys, ensure_tuple
from scipy import ndimage

__all__ = [
    "H5Reader",
    "DataError",
    "la_datalist",
    "msd_datalist",
    "folder_datalist",
    "build_datalist",
    "make_synthetic_dataset",
    "preflight",
    "check_inputs",
    "raise_failed_inputs",
    "unlabeled_items",
]

H5_SUFFIXES = (".h5", ".hdf5")
SPLITS = ("labeled", "unlabeled", "validation")
MAX_REPORTED_PROBLEMS = 20
SYNTHETIC_NAME = "SyntheticAtrium"  # the "name" of the synthetic dataset's dataset.json: its own-output marker
SYNTHETIC_SUBDIRS = ("imagesTr", "labelsTr")
SYNTHETIC_CASE = re.compile(r"case_\d{3,}\.nii\.gz")


class DataError(ValueError):
    """A dataset problem found by :func:`preflight`; the message lists every broken case."""


class H5Reader(ImageReader):
    """
    Load one dataset of HDF5 files (``.h5``/``.hdf5``) with h5py, as the LA/Pancreas h5 files of
    UA-MT and its successors (``mri_norm2.h5`` with datasets ``image`` and ``label``).

    The array is taken as spatial (``original_channel_dim="no_channel"``, so
    ``EnsureChannelFirstd`` adds the channel); a list of files is stacked on a new first
    (channel) dimension. h5 files carry no geometry, so ``affine`` is ``diag(*spacing, 1)``.

    Name it in configs as ``_target_: H5Reader`` or ``reader: monai_dualssl.data.H5Reader``. It
    is deliberately not added to MONAI's ``SUPPORTED_READERS`` (which would make the bare name
    ``"H5Reader"`` resolve): every ``LoadImage`` would then also hold a default
    ``H5Reader(dataset="image")`` and, when the requested dataset is missing, fall back to it and
    silently return the image as the label.

    Args:
        dataset: name (or ``group/name`` path) of the h5 dataset to read.
        spacing: voxel size in mm along each array axis (LA: 0.625 isotropic).
        dtype: if not None, cast the array to this dtype.

    Raises:
        ValueError: when a file has no dataset ``dataset`` (the message names the file and lists
            the datasets found), the array rank differs from ``len(spacing)``, or stacked files
            differ in shape.
    """

    def __init__(self, dataset: str = "image", spacing: Sequence[float] = (1.0, 1.0, 1.0), dtype=None):
        super().__init__()
        self.dataset = dataset
        self.spacing = tuple(float(s) for s in spacing)
        self.dtype = dtype

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True when every file name ends with ``.h5`` or ``.hdf5``."""
        return all(_is_h5(name) for name in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> list[h5py.File]:
        """
        Open each file read-only; :meth:`get_data` reads the dataset and closes them.

        Args:
            data: file name or list of file names.
            kwargs: passed to ``h5py.File``.
        """
        return [h5py.File(name, "r", **kwargs) for name in ensure_tuple(data)]

    def _array(self, f: h5py.File) -> np.ndarray:
        if not isinstance(f.get(self.dataset), h5py.Dataset):
            found = []
            f.visititems(lambda key, obj: found.append(key) if isinstance(obj, h5py.Dataset) else None)
            raise ValueError(f"{f.filename}: no h5 dataset '{self.dataset}' (datasets found: {found}).")
        array = f[self.dataset][()]
        return array if self.dtype is None else array.astype(self.dtype, copy=False)

    def get_data(self, img: h5py.File | Sequence[h5py.File]) -> tuple[np.ndarray, dict]:
        """
        Read ``self.dataset`` of the files opened by :meth:`read`, close them, and return the array
        (several files stacked on a new first axis) and its MONAI metadata: ``filename_or_obj``,
        ``spatial_shape``, ``affine``, ``original_affine``, ``space``, ``original_channel_dim``.

        Args:
            img: the output of :meth:`read`.
        """
        files = [img] if isinstance(img, h5py.File) else list(img)
        names = [f.filename for f in files]
        try:
            arrays = [self._array(f) for f in files]
        finally:
            for f in files:
                f.close()
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"H5Reader: files {names} differ in shape {sorted(shapes)}; cannot stack them.")
        shape = arrays[0].shape
        if len(shape) != len(self.spacing):
            raise ValueError(
                f"{names[0]}: h5 dataset '{self.dataset}' has shape {shape}, expected a "
                f"{len(self.spacing)}-D volume (one dimension per spacing value {self.spacing})."
            )
        affine = np.diag([*self.spacing, 1.0])
        meta = {
            ImageMetaKey.FILENAME_OR_OBJ: names[0],
            MetaKeys.SPATIAL_SHAPE: np.asarray(shape),
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel" if len(arrays) == 1 else 0,
        }
        return (arrays[0] if len(arrays) == 1 else np.stack(arrays)), meta


def _is_h5(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(H5_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# datalists
# ----------------------------------------------------------------------------------------------


def _case_names(paths: Sequence[str]) -> dict[str, str]:
    """Short case names: each path relative to the deepest folder holding all of them."""
    absolute = [os.path.abspath(p) for p in paths]
    if not absolute:
        return {}
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return {p: os.path.relpath(a, common) for p, a in zip(paths, absolute)}


def _overlaps(datalist: Mapping[str, Sequence[Mapping]], image_key: str = "image") -> list[str]:
    """One message per image that appears in more than one split."""
    splits_of: dict[str, list[str]] = {}
    for split in SPLITS:
        for item in datalist.get(split, []):
            if image_key in item:
                splits_of.setdefault(os.path.abspath(item[image_key]), []).append(split)
    shared = {path: splits for path, splits in splits_of.items() if len(set(splits)) > 1}
    names = _case_names(list(splits_of))
    return [f"case '{names[path]}' is in more than one split ({', '.join(splits)})" for path, splits in shared.items()]


def _checked(datalist: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Return ``datalist`` after checking that its splits are pairwise disjoint."""
    overlaps = _overlaps(datalist)
    if overlaps:
        raise ValueError("labeled, unlabeled and validation cases must be disjoint: " + "; ".join(overlaps) + ".")
    return datalist


def _split(items: list[dict], num_labeled: int | None, num_val: int | None, source: str) -> tuple[list, list, list]:
    """First ``num_labeled`` items keep their labels, the last ``num_val`` validate, the rest lose their labels."""
    num_val = num_val or 0
    num_labeled = len(items) - num_val if num_labeled is None else num_labeled
    if num_labeled < 0 or num_val < 0 or num_labeled + num_val > len(items):
        raise ValueError(
            f"{source}: num_labeled ({num_labeled}) + num_val ({num_val}) must be non-negative and at most "
            f"the {len(items)} labeled cases."
        )
    end = len(items) - num_val
    unlabeled = [{"image": item["image"]} for item in items[num_labeled:end]]
    return items[:num_labeled], unlabeled, items[end:]


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"case list file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def la_datalist(
    root: str | os.PathLike,
    num_labeled: int | None = 8,
    num_val: int = 16,
    list_file: str = "train.list",
    val_list: str | None = None,
) -> dict[str, list[dict]]:
    """
    Datalist of the LA (or any UA-MT style) h5 dataset: case ids from ``root/list_file`` in
    order, the first ``num_labeled`` labeled, the last ``num_val`` (or the ids of
    ``root/val_list``) for validation, the rest unlabeled. A case is
    ``root/volumes/<id>/mri_norm2.h5`` when ``root/volumes`` exists, else
    ``root/<id>/mri_norm2.h5``; image and label are the same file (read them with
    ``H5Reader(dataset="image")`` and ``H5Reader(dataset="label")``).

    Args:
        root: dataset folder.
        num_labeled: number of labeled cases (None: all cases not used for validation).
        num_val: number of validation cases taken from the end of ``list_file`` (ignored when
            ``val_list`` is given).
        list_file: file of case ids, one per line, relative to ``root``.
        val_list: optional file of validation case ids (e.g. ``"test.list"``), relative to ``root``.

    Raises:
        FileNotFoundError: a list file is missing, or listed cases have no h5 file (named).
        ValueError: ``num_labeled + num_val`` exceeds the number of cases, or splits overlap.
    """
    root = Path(root)
    case_dir = root / "volumes" if (root / "volumes").is_dir() else root

    def items_of(ids: list[str]) -> list[dict]:
        paths = {i: case_dir / i / "mri_norm2.h5" for i in ids}
        missing = [f"'{i}' ({p})" for i, p in paths.items() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed case(s) have no h5 file: {', '.join(missing[:10])}.")
        return [{"image": str(p), "label": str(p)} for p in paths.values()]

    items = items_of(_read_ids(root / list_file))
    if val_list is None:
        labeled, unlabeled, validation = _split(items, num_labeled, num_val, str(root / list_file))
    else:
        labeled, unlabeled, _ = _split(items, num_labeled, 0, str(root / list_file))
        validation = items_of(_read_ids(root / val_list))
    return _checked({"labeled": labeled, "unlabeled": unlabeled, "validation": validation})


def _resolve(item: Mapping | str, base: Path) -> dict:
    """MSD item (dict or bare image path) with paths made absolute against ``base``."""
    item = {"image": item} if isinstance(item, str) else dict(item)
    for key in ("image", "label"):
        if key in item:
            item[key] = os.path.normpath(base / item[key])
    return item


def _msd_items(spec: Mapping, split: str, keys: Sequence[str], path: Path) -> list[dict]:
    """Items of ``spec[split]`` resolved against ``path``'s folder; each must have every key of ``keys``."""
    items = [_resolve(item, path.parent) for item in spec.get(split, [])]
    bad = [(i, sorted(item)) for i, item in enumerate(items) if not set(keys) <= set(item)]
    if not bad:
        return items
    found = "; ".join(f"item {i} has keys {k}" for i, k in bad[:5]) + ("; ..." if len(bad) > 5 else "")
    image_only = split == "training" and all("image" in k for _, k in bad)
    hint = " (list image-only items under 'unlabeled')" if image_only else ""
    raise ValueError(
        f"{path}: {len(bad)} '{split}' item(s) lack the key(s) {list(keys)} that MSD '{split}' items need: "
        f"{found}{hint}."
    )


def msd_datalist(
    dataset_json: str | os.PathLike, num_labeled: int | None = None, num_val: int | None = None
) -> dict[str, list[dict]]:
    """
    Datalist from an MSD-style ``dataset.json``: ``training`` (image + label), optional
    ``unlabeled`` (image only) and optional ``validation`` (else the ``test`` items that have a
    label, else the last ``num_val`` training items). Relative paths are resolved against the
    json's folder.

    Args:
        dataset_json: path of the json file.
        num_labeled: if given, only the first ``num_labeled`` training items keep their labels;
            the others join ``unlabeled``.
        num_val: when the file lists no validation (or labeled test) items, the last
            ``num_val`` training items validate; ignored otherwise.

    Raises:
        FileNotFoundError: the json file is missing.
        ValueError: no ``training`` list, an item without the keys of its list (``training`` and
            ``validation``: ``image`` and ``label``; ``unlabeled``: ``image``), bad counts, or
            overlapping splits.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(f"dataset json not found: {path}")
    spec = json.loads(path.read_text())
    if not isinstance(spec.get("training"), list):
        raise ValueError(f"{path}: expected a 'training' list of {{'image', 'label'}} items, found keys {list(spec)}.")
    base = path.parent
    training = _msd_items(spec, "training", ("image", "label"), path)
    validation = _msd_items(spec, "validation", ("image", "label"), path) or [
        item for item in (_resolve(i, base) for i in spec.get("test", [])) if "label" in item
    ]
    labeled, unlabeled, held_out = _split(training, num_labeled, None if validation else num_val, str(path))
    unlabeled += [{"image": item["image"]} for item in _msd_items(spec, "unlabeled", ("image",), path)]
    return _checked({"labeled": labeled, "unlabeled": unlabeled, "validation": validation or held_out})


def folder_datalist(
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    num_labeled: int | None = None,
    num_val: int = 0,
    suffixes: Sequence[str] = (".nii.gz", ".nii", ".nrrd", ".mha"),
) -> dict[str, list[dict]]:
    """
    Datalist from an image folder and a label folder: an image is paired with the label of the
    same file name; images without one are unlabeled. Files are taken in sorted name order;
    hidden files (``._x.nii.gz`` of macOS archives) are skipped.

    Args:
        images_dir: folder of images.
        labels_dir: folder of labels (may be missing: then every image is unlabeled).
        num_labeled: number of paired images that keep their labels (None: all not validating).
        num_val: the last ``num_val`` paired images validate.
        suffixes: file name endings taken as images.

    Raises:
        FileNotFoundError: ``images_dir`` is missing or holds no image.
        ValueError: bad counts.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    images = sorted(
        p
        for p in images_dir.iterdir()
        if p.is_file() and p.name.endswith(tuple(suffixes)) and not p.name.startswith(".")
    )
    if not images:
        raise FileNotFoundError(f"no image files ({', '.join(suffixes)}) found in {images_dir}")
    has_label = {p: (labels_dir / p.name).is_file() for p in images}
    paired = [{"image": str(p), "label": str(labels_dir / p.name)} for p in images if has_label[p]]
    labeled, unlabeled, validation = _split(paired, num_labeled, num_val, str(images_dir))
    unlabeled += [{"image": str(p)} for p in images if not has_label[p]]
    return _checked({"labeled": labeled, "unlabeled": unlabeled, "validation": validation})


def build_datalist(source: str | os.PathLike, **kwargs) -> dict[str, list[dict]]:
    """
    Build a datalist from whatever ``source`` is: a folder with ``train.list`` (:func:`la_datalist`),
    a ``.json`` file or a folder with ``dataset.json`` (:func:`msd_datalist`), or a folder with
    ``imagesTr/`` and ``labelsTr/`` (:func:`folder_datalist`). ``kwargs`` go to that builder.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` matches none of the layouts.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"dataset source not found: {source}")
    if (source / "train.list").is_file():
        return la_datalist(source, **kwargs)
    if source.is_file() and source.suffix == ".json":
        return msd_datalist(source, **kwargs)
    if (source / "dataset.json").is_file():
        return msd_datalist(source / "dataset.json", **kwargs)
    if (source / "imagesTr").is_dir() and (source / "labelsTr").is_dir():
        return folder_datalist(source / "imagesTr", source / "labelsTr", **kwargs)
    raise ValueError(
        f"cannot tell the dataset layout of {source}: expected a folder with train.list (h5 cases), a "
        "dataset.json file or a folder holding one (MSD), or a folder with imagesTr/ and labelsTr/."
    )


# ----------------------------------------------------------------------------------------------
# synthetic dataset
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# preflight
# ----------------------------------------------------------------------------------------------


def _load(path: str, key: str, reader) -> MetaTensor:
    """``path`` loaded channel-first as training loads it: h5 files with ``H5Reader(dataset=key)`` unless
    ``reader`` is given, other files with ``reader`` when it reads their suffix, else with MONAI's reader
    for the suffix (whose own error then surfaces)."""
    if isinstance(reader, Mapping):
        reader = reader.get(key)
    if reader is None and _is_h5(path):
        reader = H5Reader(dataset=key)
    instance = reader if isinstance(reader, ImageReader) and reader.verify_suffix(path) else None
    by_name = None if isinstance(reader, ImageReader) else reader
    return LoadImage(reader=by_name, image_only=True, dtype=None, ensure_channel_first=True)(path, reader=instance)


def _first_line(error: BaseException) -> str:
    """``<type>: <first line>`` of the root cause of ``error`` (MONAI wraps transform errors in RuntimeError)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _read(item: Mapping, keys: Sequence[str], reader, ndim: int) -> tuple[dict, list[tuple[str, str]]]:
    """The files of ``keys`` in ``item`` loaded channel-first, and ``(key, problem)`` for each that could not be."""
    loaded, problems = {}, []
    for key in keys:
        if key not in item:
            continue
        if not os.path.exists(item[key]):
            problems.append((key, f"file not found: {item[key]}"))
            continue
        try:
            image = _load(item[key], key, reader)
        except Exception as e:  # every reader failure is reported, none is raised
            problems.append((key, f"cannot be read: {_first_line(e)}"))
            continue
        if image.ndim - 1 != ndim:
            problems.append((key, f"expected a {ndim}-D volume, found spatial shape {tuple(image.shape[1:])}"))
            continue
        loaded[key] = image
    return loaded, problems


def _after_transform(
    loaded: dict, transform, image_key: str, label_key: str, in_channels: int
) -> tuple[dict, list[tuple[str, str]]]:
    """``loaded`` after ``transform`` (the config's ``dataset_transform``) and ``(key, problem)`` for what the
    networks cannot take: an image without ``in_channels`` channels, a label without exactly one, an image
    with non-finite intensities."""
    data, after = dict(loaded), " after dataset_transform" if transform is not None else ""
    if transform is not None:
        try:
            data = dict(transform(data))
        except Exception as e:
            return {}, [(image_key, f"dataset_transform failed: {_first_line(e)}")]
    problems = []
    image_hint = f"the networks take {in_channels}: select channels in dataset_transform (as brats.yaml does)"
    for key, expected, hint in (
        (image_key, in_channels, image_hint),
        (label_key, 1, "a label holds class indices in one channel"),
    ):
        if key in data and data[key].shape[0] != expected:
            n = data[key].shape[0]
            problems.append((key, f"{n} channel{'s' * (n != 1)}{after} (shape {tuple(data[key].shape)}); {hint}"))
    if image_key in data:
        image = np.asarray(data[image_key])
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if bad:
            problems.append((image_key, f"{bad} non-finite intensities (NaN/Inf)"))
    return data, problems


def _label_problem(values: np.ndarray, num_classes: int) -> str | None:
    """Why the sorted unique label ``values`` do not fit classes ``0..num_classes-1``, or None."""
    fractional = values[values != np.round(values)]
    if fractional.size:
        return f"label values {fractional[:10].tolist()} are not integers"
    if values.size and (values[0] < 0 or values[-1] >= num_classes):
        return (
            f"label values {values.astype(int)[:20].tolist()} outside the declared classes "
            f"0..{num_classes - 1} (num_classes={num_classes})"
        )
    return None


def _check_case(
    item: Mapping, case: str, keys: tuple[str, str], num_classes: int, ndim: int, reader, transform, in_channels: int
) -> tuple[list[str], tuple[int, ...] | None, np.ndarray, bool | None]:
    """Problems of one datalist item, its image spatial shape (None if unreadable), its label values and
    whether its label has foreground after ``transform`` (None without a readable label)."""
    image_key, label_key = keys
    loaded, found = _read(item, keys, reader, ndim)
    shape = tuple(loaded[image_key].shape[1:]) if image_key in loaded else None
    values, foreground = np.zeros(0), None
    if label_key in loaded:
        label_shape = tuple(loaded[label_key].shape[1:])
        if shape is not None and label_shape != shape:
            found.append((label_key, f"label spatial shape {label_shape} differs from image spatial shape {shape}"))
        values = np.unique(np.asarray(loaded[label_key]))
        problem = _label_problem(values, num_classes)
        if problem:
            found.append((label_key, problem))
    if len(loaded) == sum(key in item for key in keys):  # every file loaded: check what the networks will see
        data, more = _after_transform(loaded, transform, image_key, label_key, in_channels)
        found += more
        foreground = bool(np.asarray(data[label_key]).any()) if label_key in data else None
    return [f"case '{case}' (key '{key}'): {problem}" for key, problem in found], shape, values, foreground


def _check_patch(patch_size: Sequence[int], divisor: int) -> None:
    """Raise ``ValueError`` unless every size of ``patch_size`` is divisible by ``divisor``, suggesting the nearest."""
    sizes = [int(p) for p in patch_size]
    bad = [p for p in sizes if p % divisor]
    if bad:
        lower = [max(p // divisor, 1) * divisor for p in sizes]
        upper = [-(-p // divisor) * divisor for p in sizes]
        raise ValueError(
            f"patch_size {sizes}: every size must be divisible by {divisor} (the networks downsample "
            f"{divisor.bit_length() - 1} times), found {', '.join(map(str, bad))}; nearest valid patch sizes: "
            f"{lower} or {upper}."
        )


def unlabeled_items(datalist: Mapping[str, Sequence[Mapping]]) -> list:
    """The ``unlabeled`` split of ``datalist``, which the semi-supervised trainer needs.

    Raises:
        DataError: the split is empty (e.g. an imagesTr/labelsTr folder where every image has a label
            and ``num_labeled`` was not given), saying how to get unlabeled cases or train supervised only.
    """
    items = list(datalist.get("unlabeled", []))
    if not items:
        n = len(datalist.get("labeled", []))
        raise DataError(
            f"no unlabeled case: all {n} cases with a label are labeled, and semi-supervised training needs "
            f"unlabeled ones. Set num_labeled below {n} (e.g. --num_labeled {max(1, n // 5)}) to train the rest as "
            "unlabeled, list 'unlabeled' items in dataset.json, or merge supervised.yaml to train on the labeled "
            "cases only."
        )
    return items


def _warn_missing_splits(datalist: Mapping[str, Sequence[Mapping]]) -> None:
    """Warn when there is no validation case (training would keep no model)."""
    if not datalist.get("validation"):
        warnings.warn(
            "preflight: no validation case: training will validate nothing and so write no model.pt (only its "
            "checkpoints); set num_val (e.g. --num_val 4) or list 'validation' items in dataset.json."
        )


def _empty_labels(foreground: Mapping[str, list[bool]], label_key: str, transformed: bool) -> list[str]:
    """A problem for the labeled and for the validation split when every label read there is background only."""
    why = {
        "labeled": "the networks would learn background only",
        "validation": "the validation Dice is undefined, so the best model would stay the one of the first validation",
    }
    after = " after dataset_transform" if transformed else ""
    return [
        f"every {split} label (key '{label_key}', {len(foreground[split])} cases) is empty (background only{after}): "
        f"{reason}; check the label files and the label mapping"
        for split, reason in why.items()
        if foreground[split] and not any(foreground[split])
    ]


def preflight(
    datalist: Mapping[str, Sequence[Mapping]],
    num_classes: int,
    patch_size: Sequence[int],
    image_key: str = "image",
    label_key: str = "label",
    reader=None,
    allow_pad: bool = True,
    transform=None,
    in_channels: int = 1,
    patch_divisor: int = 1,
) -> dict:
    """
    Check a datalist before training: ``patch_size`` is divisible by ``patch_divisor`` (checked first,
    before any file is read); every file exists and loads with the reader training uses (h5:
    ``H5Reader(dataset=key)``, else MONAI's choice by suffix) as a volume of ``len(patch_size)``
    dimensions; after ``transform`` the image has ``in_channels`` channels and the label one;
    intensities are finite; image and label spatial shapes agree; labels are integers in
    ``[0, num_classes)``; there is a labeled case, every validation case has a label, the labeled
    labels are not all empty, nor the validation labels; the splits are disjoint and, unless
    ``allow_pad``, no training (labeled or unlabeled) volume is smaller than ``patch_size``. Every
    problem is collected, then one :class:`DataError` lists them (the first 20). A datalist
    without unlabeled or without validation cases only gets a warning, at the start.

    Args:
        datalist: ``{"labeled": [...], "unlabeled": [...], "validation": [...]}`` as built by
            :func:`build_datalist`.
        num_classes: number of classes including background (label values before ``transform``).
        patch_size: training crop size; its length is the number of spatial dimensions.
        image_key: item key of the image.
        label_key: item key of the label.
        reader: reader for every file (an ``ImageReader``, a name for ``LoadImage``, or a
            ``{key: reader}`` mapping); None picks one from the file suffix.
        allow_pad: if True, training volumes smaller than ``patch_size`` are only counted (they
            will be padded); if False each is a problem.
        transform: the config's ``dataset_transform``, applied to each loaded (channel-first) case
            before the channel, intensity and empty-label checks; None: no transform.
        in_channels: number of image channels the networks take.
        patch_divisor: every patch size must be a multiple of it (16 for the bundle's networks,
            which downsample 4 times; 1: no check).

    Returns:
        a summary: case counts per split, ``min_shape`` / ``max_shape`` over the images, the
        ``label_values`` found and ``smaller_than_patch``, the training volumes to be padded.

    Raises:
        ValueError: ``patch_size`` is not divisible by ``patch_divisor`` (the nearest valid sizes are named).
        DataError: listing every problem as ``case '<file>' (key '<key>'): <expected vs found>``.
    """
    _check_patch(patch_size, patch_divisor)
    _warn_missing_splits(datalist)
    problems = [
        f"item {i} of '{split}' has no key '{image_key}' (keys found: {sorted(item)})"
        for split in SPLITS
        for i, item in enumerate(datalist.get(split, []))
        if image_key not in item
    ]
    cases = [(split, item) for split in SPLITS for item in datalist.get(split, []) if image_key in item]
    problems += _overlaps(datalist, image_key)
    if not any(label_key in item for split, item in cases if split == "labeled"):
        problems.append(f"no labeled case: no item of 'labeled' has key '{label_key}'")
    names = _case_names([item[image_key] for _, item in cases])
    shapes, values, small, foreground = [], set(), 0, {split: [] for split in SPLITS}
    for split, item in cases:
        case = names[item[image_key]]
        if split == "validation" and label_key not in item:
            problems.append(f"case '{case}' (split 'validation'): no key '{label_key}'; validation cases need a label")
        keys = (image_key, label_key)
        found, shape, labels, fg = _check_case(
            item, case, keys, num_classes, len(patch_size), reader, transform, in_channels
        )
        problems += found
        values.update(labels.tolist())
        if fg is not None:
            foreground[split].append(fg)
        if shape is None:
            continue
        shapes.append(shape)
        if split != "validation" and any(s < p for s, p in zip(shape, patch_size)):
            small += 1
            if not allow_pad:
                problems.append(
                    f"case '{case}' (key '{image_key}'): spatial shape {shape} smaller than patch_size "
                    f"{tuple(patch_size)} (allow_pad=False)"
                )
    problems += _empty_labels(foreground, label_key, transform is not None)
    if problems:
        listed = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = len(problems) - MAX_REPORTED_PROBLEMS
        raise DataError(
            f"{len(problems)} dataset problem(s) found before training:\n  {listed}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return {
        **{split: len(datalist.get(split, [])) for split in SPLITS},
        "min_shape": tuple(int(s) for s in np.min(shapes, axis=0)) if shapes else None,
        "max_shape": tuple(int(s) for s in np.max(shapes, axis=0)) if shapes else None,
        "label_values": sorted(values),
        "smaller_than_patch": small,
    }


# ----------------------------------------------------------------------------------------------
# inference inputs
# ----------------------------------------------------------------------------------------------


def check_inputs(
    paths: Sequence[str], reader=None, transform=None, in_channels: int = 1, ndim: int = 3, image_key: str = "image"
) -> dict:
    """
    Check the images of an inference run before any is segmented, as :func:`preflight` checks training
    images: each loads (``reader``: e.g. inference's ``H5Reader``, which leaves other files to MONAI's
    readers), is a ``ndim``-D volume, has ``in_channels`` channels after ``transform`` (the config's
    ``dataset_transform``) and only finite intensities. An image with a NaN or Inf voxel is not
    segmented (it would come out all background): clean it first, e.g. with ``numpy.nan_to_num``.
    Each failure is warned about when found; :func:`raise_failed_inputs` raises after the others ran.

    Args:
        paths: image files (or DICOM folders).
        reader: reader of the inference preprocessing (None: MONAI's choice by suffix, h5 by ``H5Reader``).
        transform: applied to ``{image_key: image}`` after loading; None: none.
        in_channels: number of image channels the network takes.
        ndim: number of spatial dimensions.
        image_key: key under which ``transform`` finds the image.

    Returns:
        ``{"readable": [paths to segment], "failed": {path: problem}}``.
    """
    readable, failed = [], {}
    for path in paths:
        loaded, found = _read({image_key: path}, (image_key,), reader, ndim)
        if not found:
            found = _after_transform(loaded, transform, image_key, "", in_channels)[1]
        if found:
            failed[path] = "; ".join(problem for _, problem in found)
            warnings.warn(f"{path}: {failed[path]}; not segmented.")
        else:
            readable.append(path)
    return {"readable": readable, "failed": failed}


def raise_failed_inputs(checked: Mapping) -> None:
    """
    Raise :class:`DataError` naming every input :func:`check_inputs` found unusable, if any (call it last,
    after the readable inputs are segmented, so the run ends with a non-zero exit code).
    """
    failed = checked["failed"]
    if failed:
        listed = "\n  ".join(f"{path}: {problem}" for path, problem in failed.items())
        raise DataError(
            f"{len(failed)} of {len(failed) + len(checked['readable'])} input image(s) could not be segmented "
            f"({len(checked['readable'])} segmented):\n  {listed}"
        )
