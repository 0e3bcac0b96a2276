"""Data side of the bundle: an h5 reader, datalist builders, a synthetic dataset and a preflight check.

- :class:`H5Reader`: MONAI :class:`~monai.data.ImageReader` for the field's ``mri_norm2.h5`` files
  (one h5 dataset per reader: ``H5Reader(dataset="image")`` / ``H5Reader(dataset="label")``).
- :func:`la_datalist`, :func:`msd_datalist`, :func:`folder_datalist` and the dispatching
  :func:`build_datalist`: ``{"labeled": [...], "unlabeled": [...], "validation": [...]}`` of
  MONAI item dicts, the three splits checked to be disjoint.
- :func:`make_synthetic_dataset`: the bundle's default dataset, generated on first use.
- :func:`preflight`: loads every case once and reports every problem before training starts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from monai.data import ImageReader
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
]

H5_SUFFIXES = (".h5", ".hdf5")
SPLITS = ("labeled", "unlabeled", "validation")
MAX_REPORTED_PROBLEMS = 20


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
        ValueError: no ``training`` list, a training item without ``label``, bad counts, or
            overlapping splits.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(f"dataset json not found: {path}")
    spec = json.loads(path.read_text())
    if not isinstance(spec.get("training"), list):
        raise ValueError(f"{path}: expected a 'training' list of {{'image', 'label'}} items, found keys {list(spec)}.")
    base = path.parent
    training = [_resolve(item, base) for item in spec["training"]]
    unlabeled_items = [i for i, item in enumerate(training) if "label" not in item]
    if unlabeled_items:
        raise ValueError(
            f"{path}: 'training' items {unlabeled_items[:10]} have no 'label'; list them under 'unlabeled'."
        )
    validation = [_resolve(item, base) for item in spec.get("validation", [])] or [
        item for item in (_resolve(i, base) for i in spec.get("test", [])) if "label" in item
    ]
    labeled, unlabeled, held_out = _split(training, num_labeled, None if validation else num_val, str(path))
    unlabeled += [{"image": _resolve(item, base)["image"]} for item in spec.get("unlabeled", [])]
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

    Nothing is written when ``root/dataset.json`` exists (unless ``overwrite``). Cases are written
    to a temporary folder beside ``root`` and moved in, ``dataset.json`` last, so an interrupted
    run never leaves a dataset that looks complete. Call it from one process (e.g. rank 0).

    Args:
        root: dataset folder.
        num_cases: number of volumes.
        num_labeled: cases listed with labels under ``training``.
        num_val: cases listed under ``validation``.
        shape: mean volume shape (x, y, z), each at least 32.
        seed: generator seed.
        overwrite: regenerate even if ``root/dataset.json`` exists.

    Returns:
        the path of ``root/dataset.json``.

    Raises:
        ValueError: bad counts or shape.
        FileExistsError: ``root`` holds ``imagesTr``/``labelsTr`` but no ``dataset.json`` (not
            overwritten unless ``overwrite``).
    """
    root = Path(root)
    target = root / "dataset.json"
    if target.is_file() and not overwrite:
        return target
    if num_labeled < 1 or num_val < 0 or num_labeled + num_val > num_cases:
        raise ValueError(
            f"need 1 <= num_labeled and num_labeled ({num_labeled}) + num_val ({num_val}) <= num_cases ({num_cases})."
        )
    if len(shape) != 3 or min(shape) < 32:
        raise ValueError(f"shape must be 3 sizes of at least 32 voxels, found {tuple(shape)}.")
    subdirs = ("imagesTr", "labelsTr")
    if not overwrite and any((root / d).exists() for d in subdirs):
        raise FileExistsError(
            f"{root} holds imagesTr/ or labelsTr/ but no dataset.json; pass overwrite=True or use another folder."
        )

    names = [f"case_{i:03d}.nii.gz" for i in range(num_cases)]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for d in subdirs:
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
            "name": "SyntheticAtrium",
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
        for d in subdirs:
            shutil.rmtree(root / d, ignore_errors=True)
            os.replace(tmp / d, root / d)
        os.replace(tmp / "dataset.json", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# preflight
# ----------------------------------------------------------------------------------------------


def _load(path: str, key: str, reader) -> tuple[np.ndarray, tuple[int, ...]]:
    """Array and spatial shape of ``path`` read as training reads it (h5: ``H5Reader(dataset=key)``)."""
    if isinstance(reader, Mapping):
        reader = reader.get(key)
    if reader is None and _is_h5(path):
        reader = H5Reader(dataset=key)
    if isinstance(reader, ImageReader):
        array, meta = reader.get_data(reader.read(path))
    else:
        image = LoadImage(reader=reader, image_only=True, dtype=None)(path)
        array, meta = image.numpy(), image.meta
    return np.asarray(array), tuple(int(s) for s in meta[MetaKeys.SPATIAL_SHAPE])


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
    item: Mapping, case: str, image_key: str, label_key: str, num_classes: int, ndim: int, reader
) -> tuple[list[str], tuple[int, ...] | None, np.ndarray]:
    """Problems of one datalist item, its image spatial shape (None if unreadable) and its label values."""
    problems, loaded = [], {}
    for key in (image_key, label_key):
        if key not in item:
            continue
        if not os.path.isfile(item[key]):
            problems.append(f"case '{case}' (key '{key}'): file not found: {item[key]}")
            continue
        try:
            array, shape = _load(item[key], key, reader)
        except Exception as e:  # every reader failure is reported, none is raised
            problems.append(f"case '{case}' (key '{key}'): cannot be read: {type(e).__name__}: {e}")
            continue
        if len(shape) < ndim:
            problems.append(f"case '{case}' (key '{key}'): expected a {ndim}-D volume, found spatial shape {shape}")
            continue
        loaded[key] = array, shape[:ndim]
    shape, values = None, np.zeros(0)
    if image_key in loaded:
        image, shape = loaded[image_key]
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if bad:
            problems.append(f"case '{case}' (key '{image_key}'): {bad} non-finite intensities (NaN/Inf)")
    if label_key in loaded:
        label, label_shape = loaded[label_key]
        if shape is not None and label_shape != shape:
            problems.append(
                f"case '{case}' (key '{label_key}'): label spatial shape {label_shape} differs from image "
                f"spatial shape {shape}"
            )
        values = np.unique(label)
        problem = _label_problem(values, num_classes)
        if problem:
            problems.append(f"case '{case}' (key '{label_key}'): {problem}")
    return problems, shape, values


def preflight(
    datalist: Mapping[str, Sequence[Mapping]],
    num_classes: int,
    patch_size: Sequence[int],
    image_key: str = "image",
    label_key: str = "label",
    reader=None,
    allow_pad: bool = True,
) -> dict:
    """
    Check a datalist before training: every file exists and loads with the reader training
    uses (h5: ``H5Reader(dataset=key)``, else MONAI's choice by suffix), intensities are finite,
    image and label spatial shapes agree, labels are integers in ``[0, num_classes)``, there is a
    labeled case, the splits are disjoint and, unless ``allow_pad``, no training (labeled or
    unlabeled) volume is smaller than ``patch_size``. Every problem is collected, then one
    :class:`DataError` lists them (the first 20).

    Args:
        datalist: ``{"labeled": [...], "unlabeled": [...], "validation": [...]}`` as built by
            :func:`build_datalist`.
        num_classes: number of classes including background.
        patch_size: training crop size; its length is the number of spatial dimensions.
        image_key: item key of the image.
        label_key: item key of the label.
        reader: reader for every file (an ``ImageReader``, a name for ``LoadImage``, or a
            ``{key: reader}`` mapping); None picks one from the file suffix.
        allow_pad: if True, training volumes smaller than ``patch_size`` are only counted (they
            will be padded); if False each is a problem.

    Returns:
        a summary: case counts per split, ``min_shape`` / ``max_shape`` over the images, the
        ``label_values`` found and ``smaller_than_patch``, the training volumes to be padded.

    Raises:
        DataError: listing every problem as ``case '<file>' (key '<key>'): <expected vs found>``.
    """
    problems = [
        f"item {i} of '{split}' has no key '{image_key}'"
        for split in SPLITS
        for i, item in enumerate(datalist.get(split, []))
        if image_key not in item
    ]
    cases = [(split, item) for split in SPLITS for item in datalist.get(split, []) if image_key in item]
    problems += _overlaps(datalist, image_key)
    if not any(label_key in item for split, item in cases if split == "labeled"):
        problems.append(f"no labeled case: no item of 'labeled' has key '{label_key}'")
    names = _case_names([item[image_key] for _, item in cases])
    shapes, values, small = [], set(), 0
    for split, item in cases:
        case = names[item[image_key]]
        found, shape, labels = _check_case(item, case, image_key, label_key, num_classes, len(patch_size), reader)
        problems += found
        values.update(labels.tolist())
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
