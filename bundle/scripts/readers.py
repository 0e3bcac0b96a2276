"""Image readers: the h5 reader of the field's ``mri_norm2.h5`` files.

- :class:`H5Reader`: MONAI :class:`~monai.data.ImageReader` for the field's ``mri_norm2.h5`` files
  (one h5 dataset per reader: ``H5Reader(dataset="image")`` / ``H5Reader(dataset="label")``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import h5py
import numpy as np
from monai.data import ImageReader
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys, ensure_tuple

__all__ = ["H5Reader"]

H5_SUFFIXES = (".h5", ".hdf5")


class H5Reader(ImageReader):
    """
    Load one dataset of HDF5 files (``.h5``/``.hdf5``) with h5py, as the LA/Pancreas h5 files of
    UA-MT and its successors (``mri_norm2.h5`` with datasets ``image`` and ``label``).

    The array is taken as spatial (``original_channel_dim="no_channel"``, so
    ``EnsureChannelFirstd`` adds the channel); a list of files is stacked on a new first
    (channel) dimension. h5 files carry no geometry, so ``affine`` is ``diag(*spacing, 1)``.

    Name it in configs as ``_target_: H5Reader`` or ``reader: monai_dualssl.readers.H5Reader``. It
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
