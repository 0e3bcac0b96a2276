"""Datalists: the labeled, unlabeled and validation splits of a dataset, from its layout on disk.

- :func:`la_datalist`, :func:`acdc_datalist`, :func:`msd_datalist`, :func:`folder_datalist` and the
  dispatching :func:`build_datalist`: ``{"labeled": [...], "unlabeled": [...], "validation": [...]}`` of
  MONAI item dicts (plus ``"test"`` where the layout names test cases), the splits checked to be disjoint
  (``num_labeled`` / ``num_val`` choose them).
- :func:`split_items`: one split of a datalist by name (what ``evaluate.yaml`` scores: ``eval_split``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .readers import SLICE_WILDCARD, slice_files

__all__ = ["la_datalist", "acdc_datalist", "msd_datalist", "folder_datalist", "build_datalist", "split_items"]

SPLITS = ("labeled", "unlabeled", "validation")
#: held-out splits some layouts add (ACDC's test.list); never trained on, checked disjoint from the others
EXTRA_SPLITS = ("test",)


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
    for split in SPLITS + EXTRA_SPLITS:
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
        raise ValueError("labeled, unlabeled, validation and test cases must be disjoint: " + "; ".join(overlaps) + ".")
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


def acdc_datalist(
    root: str | os.PathLike,
    num_labeled: int | None = 14,
    num_val: int | None = 0,
    list_file: str = "train.list",
    val_list: str | None = "val.list",
    test_list: str | None = "test.list",
    data_dir: str = "data",
) -> dict[str, list[dict]]:
    """
    Datalist of the ACDC h5 layout of the field's semi-supervised repositories (SSL4MIS and successors):
    case ids in ``root/train.list``, ``root/val.list`` and ``root/test.list``; a case is the whole volume
    ``root/data/<id>.h5`` when it exists, else the slice pattern ``root/data/<id>_slice_*.h5`` (a volume
    stored as 2-D slice files, stacked in numeric order of N by :class:`~monai_dualssl.readers.H5Reader`).
    The first ``num_labeled`` ids of ``list_file`` are labeled, the others unlabeled; the ids of ``val_list``
    validate (or, with ``val_list=None``, the last ``num_val`` ids of ``list_file``), and the ids of
    ``test_list`` form the ``"test"`` split (for evaluation only, ``eval_split: test``). Image and label are
    the same file(s): read them with ``H5Reader(dataset="image")`` and ``H5Reader(dataset="label")``.

    Args:
        root: dataset folder.
        num_labeled: number of labeled cases (None: every case of ``list_file`` not used for validation).
        num_val: with ``val_list=None``, the number of validation cases taken from the end of ``list_file``
            (ignored otherwise).
        list_file: file of training case ids, one per line, relative to ``root``.
        val_list: file of validation case ids relative to ``root``, or None.
        test_list: file of test case ids relative to ``root``, or None (no ``"test"`` split).
        data_dir: folder of the h5 files, relative to ``root``.

    Raises:
        FileNotFoundError: a list file is missing, or listed cases have neither a volume file nor slice
            files (named).
        ValueError: bad counts, or splits overlap. (Slice files numbered with gaps or twice are left to
            :func:`~monai_dualssl.preflight`, which reports every such case at once.)
    """
    root = Path(root)
    case_dir = root / data_dir

    def path_of(case: str) -> str | None:
        volume = case_dir / f"{case}.h5"
        if volume.is_file():
            return str(volume)
        pattern = case_dir / f"{case}_slice_{SLICE_WILDCARD}.h5"
        try:
            return str(pattern) if slice_files(pattern) else None
        except ValueError:  # slice files numbered with gaps or twice: preflight names every such case
            return str(pattern)

    def items_of(ids: list[str]) -> list[dict]:
        paths = {i: path_of(i) for i in ids}
        missing = [f"'{i}'" for i, p in paths.items() if p is None]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} listed case(s) have neither {case_dir}/<id>.h5 nor {case_dir}/<id>_slice_<N>.h5 "
                f"files: {', '.join(missing[:10])}."
            )
        return [{"image": p, "label": p} for p in paths.values()]

    items = items_of(_read_ids(root / list_file))
    if val_list is None:
        labeled, unlabeled, validation = _split(items, num_labeled, num_val, str(root / list_file))
    else:
        labeled, unlabeled, _ = _split(items, num_labeled, 0, str(root / list_file))
        validation = items_of(_read_ids(root / val_list))
    datalist = {"labeled": labeled, "unlabeled": unlabeled, "validation": validation}
    if test_list is not None:
        datalist["test"] = items_of(_read_ids(root / test_list))
    return _checked(datalist)


def split_items(datalist: Mapping[str, Sequence[Mapping]], split: str) -> list:
    """
    The items of one split of ``datalist`` (``evaluate.yaml`` scores ``split_items(@datalist, @eval_split)``).

    Raises:
        ValueError: ``datalist`` has no split ``split`` (the splits it has are named), or it is empty.
    """
    if split not in datalist:
        raise ValueError(
            f"the datalist has no '{split}' split (it has: {', '.join(datalist)}); eval_split must be one of them "
            "(a 'test' split comes from layouts that list test cases, e.g. ACDC's test.list)."
        )
    items = list(datalist[split])
    if not items:
        raise ValueError(f"the datalist's '{split}' split is empty; nothing to evaluate.")
    return items


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
    Build a datalist from whatever ``source`` is: a folder with ``train.list`` and a ``data/`` folder of h5
    files (ACDC, :func:`acdc_datalist`), another folder with ``train.list`` (:func:`la_datalist`), a ``.json``
    file or a folder with ``dataset.json`` (:func:`msd_datalist`), or a folder with ``imagesTr/`` and
    ``labelsTr/`` (:func:`folder_datalist`). ``kwargs`` go to that builder.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` matches none of the layouts.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"dataset source not found: {source}")
    if (source / "train.list").is_file() and (source / "data").is_dir():
        return acdc_datalist(source, **kwargs)
    if (source / "train.list").is_file():
        return la_datalist(source, **kwargs)
    if source.is_file() and source.suffix == ".json":
        return msd_datalist(source, **kwargs)
    if (source / "dataset.json").is_file():
        return msd_datalist(source / "dataset.json", **kwargs)
    if (source / "imagesTr").is_dir() and (source / "labelsTr").is_dir():
        return folder_datalist(source / "imagesTr", source / "labelsTr", **kwargs)
    raise ValueError(
        f"cannot tell the dataset layout of {source}: expected a folder with train.list (h5 cases: "
        "<id>/mri_norm2.h5, or data/<id>.h5 and data/<id>_slice_<N>.h5 as ACDC), a "
        "dataset.json file or a folder holding one (MSD), or a folder with imagesTr/ and labelsTr/."
    )
