"""Checks run before training and before inference, reporting every problem at once.

- :func:`preflight`: loads every case of a datalist once and reports every problem before training starts.
- :func:`unlabeled_items`: the unlabeled split, or a clear error when there is none.
- :func:`check_inputs` / :func:`raise_failed_inputs`: the same checks for inference's images; the
  unusable ones are skipped, then named.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from monai.data import ImageReader, MetaTensor
from monai.transforms import LoadImage

from .datalists import SPLITS, _case_names, _overlaps
from .readers import H5Reader, _is_h5, is_slice_pattern, slice_files

__all__ = ["DataError", "preflight", "check_inputs", "raise_failed_inputs", "unlabeled_items"]

MAX_REPORTED_PROBLEMS = 20


class DataError(ValueError):
    """A dataset problem found by :func:`preflight`; the message lists every broken case."""


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


def _missing(path: str) -> str | None:
    """Why ``path`` (a file, DICOM folder or slice pattern) cannot be found, or None when it can."""
    if not is_slice_pattern(path):
        return None if os.path.exists(path) else f"file not found: {path}"
    try:
        return None if slice_files(path) else f"no slice file matches {path}"
    except ValueError as e:
        return str(e)


def _read(item: Mapping, keys: Sequence[str], reader, ndim: int) -> tuple[dict, list[tuple[str, str]]]:
    """The files of ``keys`` in ``item`` loaded channel-first, and ``(key, problem)`` for each that could not be."""
    loaded, problems = {}, []
    for key in keys:
        if key not in item:
            continue
        missing = _missing(item[key])
        if missing:
            problems.append((key, missing))
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


def _check_patch(patch_size: Sequence[int], divisor: int | Sequence[int]) -> None:
    """Raise ``ValueError`` unless every size of ``patch_size`` is divisible by ``divisor`` (one number, or one
    per axis), suggesting the nearest valid sizes."""
    sizes = [int(p) for p in patch_size]
    divisors = [int(divisor)] * len(sizes) if isinstance(divisor, int) else [int(k) for k in divisor]
    if len(divisors) != len(sizes):
        raise ValueError(f"patch_divisor {divisors}: expected one number or {len(sizes)} (one per axis of patch_size {sizes}).")
    bad = [p for p, k in zip(sizes, divisors) if p % k]
    if bad:
        lower = [max(p // k, 1) * k for p, k in zip(sizes, divisors)]
        upper = [-(-p // k) * k for p, k in zip(sizes, divisors)]
        what = (f"{divisors[0]} (the networks downsample {divisors[0].bit_length() - 1} times)" if len(set(divisors)) == 1
                else f"{divisors} along its axes (the product of the networks' strides along each)")
        raise ValueError(
            f"patch_size {sizes}: every size must be divisible by {what}, found {', '.join(map(str, bad))}; "
            f"nearest valid patch sizes: {lower} or {upper}."
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
    patch_divisor: int | Sequence[int] = 1,
) -> dict:
    """
    Check a datalist before training: ``patch_size`` is divisible by ``patch_divisor`` (checked first,
    before any file is read); every file exists (a slice pattern: its slice files, numbered without gaps)
    and loads with the reader training uses (``reader``; by default h5: ``H5Reader(dataset=key)``, else
    MONAI's choice by suffix) as a volume of ``len(patch_size)``
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
        patch_divisor: every patch size must be a multiple of it, one number or one per axis (16 for the
            bundle's networks, which downsample 4 times by 2; :func:`~monai_dualssl.networks.stride_divisors`
            for other strides; 1: no check).

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
