"""Image readers: the h5 reader of the field's ``mri_norm2.h5`` files and of volumes stored as 2-D slices.

- :class:`H5Reader`: MONAI :class:`~monai.data.ImageReader` for the field's ``mri_norm2.h5`` files
  (one h5 dataset per reader: ``H5Reader(dataset="image")`` / ``H5Reader(dataset="label")``), and for
  volumes stored as one h5 file per slice (ACDC's ``<case>_slice_<N>.h5``), named by a slice pattern.
- :func:`slice_files`: the slice files of a pattern such as ``data/patient003_frame01_slice_*.h5``, in
  numeric order of the number that replaces ``*``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

import h5py
import numpy as np
from monai.data import ImageReader
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys, ensure_tuple

__all__ = ["H5Reader", "slice_files", "is_slice_pattern"]

H5_SUFFIXES = (".h5", ".hdf5")
#: the wildcard of a slice pattern: it stands for the slice number
SLICE_WILDCARD = "*"


def is_slice_pattern(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a volume stored as slice files (its file name holds ``*``)."""
    return SLICE_WILDCARD in os.path.basename(os.fspath(path))


def slice_files(pattern: str | os.PathLike) -> list[str]:
    """
    The files of a slice pattern, in numeric order of the slice number: ``data/case_slice_*.h5`` matches
    ``data/case_slice_<N>.h5`` for every integer ``N`` (``slice_2`` comes before ``slice_10``). Files whose
    ``*`` part is not a number are not slices of the pattern (``case_slice_2_mask.h5`` is not one).

    Args:
        pattern: a path whose file name holds one ``*``.

    Returns:
        the matching paths (``[]`` when none exists).

    Raises:
        ValueError: the file name holds no ``*`` or more than one; two files carry the same number
            (``slice_1`` and ``slice_01``); or the numbers have gaps (a slice file is missing).
    """
    pattern = os.fspath(pattern)
    folder, name = os.path.split(pattern)
    if name.count(SLICE_WILDCARD) != 1:
        raise ValueError(f"slice pattern {pattern}: the file name must hold exactly one '{SLICE_WILDCARD}'.")
    head, tail = name.split(SLICE_WILDCARD)
    number = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    found: dict[int, list[str]] = {}
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(head) + "*" + glob.escape(tail))):
        match = number.fullmatch(os.path.basename(path))
        if match:
            found.setdefault(int(match.group(1)), []).append(path)
    if not found:
        return []
    twice = {n: sorted(paths) for n, paths in found.items() if len(paths) > 1}
    if twice:
        raise ValueError(f"slice pattern {pattern}: several files carry the same slice number: {twice}.")
    missing = sorted(set(range(min(found), max(found) + 1)) - set(found))
    if missing:
        raise ValueError(
            f"slice pattern {pattern}: slices {min(found)}..{max(found)} found but {missing[:10]} missing; a volume "
            "needs every slice."
        )
    return [found[n][0] for n in sorted(found)]


class _SliceStack:
    """The open slice files of one slice pattern (what :meth:`H5Reader.read` returns for a pattern)."""

    def __init__(self, pattern: str, files: list[h5py.File]):
        self.filename = pattern
        self.files = files

    def close(self) -> None:
        for f in self.files:
            f.close()


class H5Reader(ImageReader):
    """
    Load one dataset of HDF5 files (``.h5``/``.hdf5``) with h5py, as the LA/Pancreas h5 files of
    UA-MT and its successors (``mri_norm2.h5`` with datasets ``image`` and ``label``).

    The array is taken as spatial (``original_channel_dim="no_channel"``, so
    ``EnsureChannelFirstd`` adds the channel); a list of files is stacked on a new first
    (channel) dimension. h5 files carry no geometry, so ``affine`` is ``diag(*spacing, 1)``.

    A file name holding ``*`` is a *slice pattern*: a volume stored as one file per slice (ACDC's
    training cases, ``data/patient003_frame01_slice_*.h5`` for ``..._slice_1.h5`` to ``..._slice_10.h5``).
    Its files (:func:`slice_files`, numeric order of the slice number) are read and their 2-D arrays
    stacked on a new first axis, the layout of the whole-volume files of the same dataset
    (``(slices, H, W)``); ``filename_or_obj`` is the pattern. ``transpose`` then reorders the axes of
    every array, pattern or not (ACDC: ``(2, 1, 0)`` puts the slice axis last, as the third spatial
    axis, in the index order of the original NIfTI files).

    Name it in configs as ``_target_: H5Reader`` or ``reader: monai_dualssl.readers.H5Reader``. It
    is deliberately not added to MONAI's ``SUPPORTED_READERS`` (which would make the bare name
    ``"H5Reader"`` resolve): every ``LoadImage`` would then also hold a default
    ``H5Reader(dataset="image")`` and, when the requested dataset is missing, fall back to it and
    silently return the image as the label.

    Args:
        dataset: name (or ``group/name`` path) of the h5 dataset to read.
        spacing: voxel size in mm along each axis of the returned array (after ``transpose``;
            LA: 0.625 isotropic).
        dtype: if not None, cast the array to this dtype.
        transpose: if not None, the order of the stored array's axes in the returned one
            (``numpy.transpose``'s ``axes``), e.g. ``(2, 1, 0)`` for ACDC's ``(slices, H, W)`` arrays.

    Raises:
        FileNotFoundError: a slice pattern matches no file.
        ValueError: when a file has no dataset ``dataset`` (the message names the file and lists
            the datasets found), the array rank differs from ``len(spacing)`` or ``len(transpose)``,
            stacked files or slices differ in shape, or a slice pattern's numbers have gaps.
    """

    def __init__(
        self,
        dataset: str = "image",
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        dtype=None,
        transpose: Sequence[int] | None = None,
    ):
        super().__init__()
        self.dataset = dataset
        self.spacing = tuple(float(s) for s in spacing)
        self.dtype = dtype
        self.transpose = None if transpose is None else tuple(int(a) for a in transpose)
        if self.transpose is not None and sorted(self.transpose) != list(range(len(self.transpose))):
            raise ValueError(f"H5Reader: transpose must be a permutation of 0..n-1, found {tuple(transpose)}.")

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True when every file name ends with ``.h5`` or ``.hdf5``."""
        return all(_is_h5(name) for name in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> list:
        """
        Open each file read-only (every slice file of a slice pattern); :meth:`get_data` reads the dataset
        and closes them.

        Args:
            data: file name (or slice pattern) or list of them.
            kwargs: passed to ``h5py.File``.

        Raises:
            FileNotFoundError: a slice pattern matches no file.
        """
        opened: list = []
        try:
            for name in ensure_tuple(data):
                if not is_slice_pattern(name):
                    opened.append(h5py.File(name, "r", **kwargs))
                    continue
                paths = slice_files(name)
                if not paths:
                    raise FileNotFoundError(f"no slice file matches {os.fspath(name)}.")
                stack = _SliceStack(os.fspath(name), [])
                opened.append(stack)
                stack.files.extend(h5py.File(p, "r", **kwargs) for p in paths)
        except BaseException:
            for f in opened:
                f.close()
            raise
        return opened

    def _stacked(self, stack: _SliceStack) -> np.ndarray:
        """The slices of ``stack`` stacked on a new first axis."""
        slices = [self._array(f) for f in stack.files]
        shapes = sorted({a.shape for a in slices})
        if len(shapes) > 1:
            sizes = ", ".join(f"{os.path.basename(f.filename)}: {a.shape}" for f, a in zip(stack.files, slices))
            raise ValueError(f"{stack.filename}: the slices differ in shape ({sizes}); cannot stack them.")
        return np.stack(slices)

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
        files = [img] if isinstance(img, (h5py.File, _SliceStack)) else list(img)
        names = [f.filename for f in files]
        try:
            arrays = [self._stacked(f) if isinstance(f, _SliceStack) else self._array(f) for f in files]
        finally:
            for f in files:
                f.close()
        if self.transpose is not None:
            bad = [a.shape for a in arrays if a.ndim != len(self.transpose)]
            if bad:
                raise ValueError(
                    f"{names[0]}: h5 dataset '{self.dataset}' has shape {bad[0]}, expected {len(self.transpose)} axes "
                    f"(one per transpose entry {self.transpose})."
                )
            arrays = [np.ascontiguousarray(a.transpose(self.transpose)) for a in arrays]
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
