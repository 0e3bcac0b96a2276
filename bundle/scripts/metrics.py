"""The field's segmentation metrics, largest-component post-processing and their summaries over cases.

- :func:`binary_metrics`, :func:`segmentation_metrics`: Dice, Jaccard, 95 % Hausdorff distance and
  average surface distance with the definitions of ``medpy.metric.binary`` (which the field's tables
  use), in voxels and in millimetres, plus MONAI's symmetric average surface distance in millimetres.
  Empty masks give NaN distances and are counted, not scored 0 (:data:`EMPTY_RULE`).
- :func:`keep_largest_component`: largest-connected-component post-processing.
- :func:`summarize`: mean and standard deviation of every metric over cases, per class and, with several
  foreground classes, for the mean over classes (:data:`CLASS_MEAN_RULE`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from monai.transforms.utils import get_largest_connected_component_mask, has_measure
from scipy import ndimage

__all__ = [
    "METRIC_KEYS",
    "CLASS_MEAN",
    "CLASS_MEAN_RULE",
    "surface_voxels",
    "surface_distances",
    "binary_metrics",
    "segmentation_metrics",
    "keep_largest_component",
    "class_mean_rows",
    "summarize",
]

METRIC_KEYS = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm", "assd_mm")

EMPTY_RULE = (
    "A case whose prediction or ground truth is empty for a class is scored with Dice/Jaccard as usual "
    "(0 if one mask is empty, 1 if both are) and NaN distances; distance means and standard deviations "
    "are over the cases with both masks non-empty, and the number of empty predictions is reported. "
    "(The field's released evaluation code scores 0 for every metric on an empty prediction, which makes "
    "distances look better; this evaluation does not.)"
)
#: the class key of the mean over foreground classes in :func:`summarize`
CLASS_MEAN = "mean"
CLASS_MEAN_RULE = (
    "With several foreground classes, 'mean' is the mean over the classes per case, then summarised over cases "
    "as a class is: Dice and Jaccard average every class; a distance is averaged only for a case where it is "
    "defined for every class (else that case is left out of the distance's mean and std, as an empty mask is "
    "for one class); n_empty_pred / n_empty_gt count the cases with an empty mask in any class."
)
METRIC_NOTES = {
    "dice": "2 |intersection| / (|P| + |G|), a fraction",
    "jaccard": "|intersection| / |union|, a fraction",
    "hd95_vox": "medpy hd95 with unit spacing: 95th percentile of the pooled surface distances P->G and G->P",
    "asd_vox": "medpy asd with unit spacing: mean of the directed surface distances P->G",
    "hd95_mm": "as hd95_vox with the voxel spacing of the evaluated grid (mm)",
    "asd_mm": "as asd_vox with the voxel spacing of the evaluated grid (mm)",
    "assd_mm": "MONAI-style symmetric ASD (mm): mean of the pooled distances P->G and G->P",
    "surface": "mask XOR its erosion with the 6-connected structuring element (voxels on the volume border count)",
}


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """
    Surface of a binary mask as medpy (and MONAI's ``get_mask_edges``) define it: the mask minus its
    binary erosion with the face-connected structuring element; outside the array counts as
    background, so mask voxels on the array border are surface voxels.

    Args:
        mask: binary array of any dimension.
    """
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def _cropped_surfaces(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surfaces of ``pred`` and ``gt`` cropped to their union's bounding box plus a zero margin of 1.

    Cropping saves the distance transform of the full volume and changes no distance: every surface
    voxel lies in the box, and the zero margin plays the erosion's outside-is-background border.
    """
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(pred | gt))
    return surface_voxels(np.pad(pred[box], 1)), surface_voxels(np.pad(gt[box], 1))


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """
    Directed surface distances between two non-empty binary masks, as medpy computes them.

    Args:
        pred: binary prediction.
        gt: binary ground truth, same shape.
        spacing: voxel size per axis (None: 1, i.e. distances in voxels).

    Returns:
        ``(pred_to_gt, gt_to_pred)``: for every surface voxel of ``pred`` the Euclidean distance to
        the nearest surface voxel of ``gt``, and the reverse.

    Raises:
        ValueError: the shapes differ or a mask is empty.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, found {pred.shape} and {gt.shape}.")
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks.")
    pred_s, gt_s = _cropped_surfaces(pred, gt)
    to_gt = ndimage.distance_transform_edt(~gt_s, sampling=spacing)[pred_s]
    to_pred = ndimage.distance_transform_edt(~pred_s, sampling=spacing)[gt_s]
    return to_gt, to_pred


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> dict:
    """
    Metrics of one binary case, with medpy's definitions (see :data:`METRIC_NOTES`).

    ``dice`` and ``jaccard`` are fractions (0 if exactly one mask is empty, 1 if both are).
    ``hd95_*``: 95th percentile of the pooled distances pred->gt and gt->pred (``medpy.metric.binary.hd95``);
    ``asd_*``: mean of the directed distances pred->gt (``medpy.metric.binary.asd``); ``*_vox`` with unit
    spacing (the field's convention), ``*_mm`` with ``spacing``; ``assd_mm``: mean of the pooled
    distances (MONAI's ``compute_average_surface_distance(symmetric=True)``). Distances are NaN when
    either mask is empty (flagged by ``empty_pred`` / ``empty_gt``).

    Args:
        pred: binary prediction.
        gt: binary ground truth, same shape.
        spacing: voxel size per axis in mm (None: 1).

    Returns:
        a dict with the keys of :data:`METRIC_KEYS` and ``empty_pred``, ``empty_gt``.

    Raises:
        ValueError: the shapes differ.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, found {pred.shape} and {gt.shape}.")
    n_pred, n_gt, inter = int(pred.sum()), int(gt.sum()), int(np.count_nonzero(pred & gt))
    union = n_pred + n_gt - inter
    out = {
        "dice": 2.0 * inter / (n_pred + n_gt) if n_pred + n_gt else 1.0,
        "jaccard": inter / union if union else 1.0,
        "empty_pred": n_pred == 0,
        "empty_gt": n_gt == 0,
    }
    out.update({k: math.nan for k in METRIC_KEYS[2:]})
    if n_pred and n_gt:
        for unit, sampling in (("vox", None), ("mm", spacing)):
            to_gt, to_pred = surface_distances(pred, gt, sampling)
            pooled = np.concatenate([to_gt, to_pred])
            out[f"hd95_{unit}"] = float(np.percentile(pooled, 95))
            out[f"asd_{unit}"] = float(to_gt.mean())
        out["assd_mm"] = float(pooled.mean())  # pooled is in mm after the loop
    return out


def segmentation_metrics(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None
) -> list[dict]:
    """
    :func:`binary_metrics` of every foreground class ``1 .. num_classes - 1`` of two label maps.

    Args:
        pred: integer label map (spatial dims only).
        gt: integer label map, same shape.
        num_classes: number of classes including background.
        spacing: voxel size per axis in mm.

    Returns:
        one dict per foreground class, with its ``class`` index.
    """
    return [{"class": c, **binary_metrics(pred == c, gt == c, spacing)} for c in range(1, num_classes)]


def _largest_component_mask(mask: np.ndarray) -> np.ndarray:
    """Largest fully connected (26-neighbourhood in 3-D) component of a binary mask.

    MONAI's ``get_largest_connected_component_mask`` (scikit-image's labelling) when scikit-image is
    installed; otherwise the same component from ``scipy.ndimage.label`` with full connectivity.
    """
    if has_measure:
        return np.asarray(get_largest_connected_component_mask(mask), dtype=bool)
    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def keep_largest_component(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """
    Largest-connected-component post-processing of a label map: for every foreground class, voxels
    outside that class's largest fully connected component become background (as the field's
    ``getLargestCC``, which uses scikit-image's default full connectivity).

    Args:
        labels: integer label map (spatial dims only).
        num_classes: number of classes including background (None: ``labels.max() + 1``).
    """
    labels = np.asarray(labels)
    out = labels.copy()
    for c in range(1, int(labels.max()) + 1 if num_classes is None else num_classes):
        mask = labels == c
        if mask.any():
            out[mask & ~_largest_component_mask(mask)] = 0
    return out


def _stats(values: Iterable[float]) -> dict:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if not v.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def class_mean_rows(rows: Sequence[Mapping]) -> list[dict]:
    """
    Per case, model and post-processing with more than one foreground class, a row of class
    :data:`CLASS_MEAN`: the mean of every metric over the classes (:data:`CLASS_MEAN_RULE`; a distance is
    NaN unless every class has one), ``empty_pred`` / ``empty_gt`` true when any class's mask is empty.
    Rows without a ``case`` key give none.
    """
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        if "case" in r and str(r["class"]) != CLASS_MEAN:
            groups.setdefault((r["model"], r["postprocessing"], r["case"]), []).append(r)
    out = []
    for (model, post, case), rs in groups.items():
        if len({str(r["class"]) for r in rs}) < 2:
            continue
        row = {"case": case, "model": model, "postprocessing": post, "class": CLASS_MEAN,
               "empty_pred": any(bool(r["empty_pred"]) for r in rs), "empty_gt": any(bool(r["empty_gt"]) for r in rs)}
        row.update({k: float(np.mean([float(r[k]) for r in rs])) for k in METRIC_KEYS})  # NaN if any class's is
        out.append(row)
    return out


def summarize(rows: Sequence[Mapping]) -> dict:
    """
    Mean and (population, ``ddof=0``) standard deviation of every metric over cases, per model,
    post-processing and class, ignoring NaN (empty-mask) distances. With more than one foreground class
    (and a ``case`` key in the rows), the class :data:`CLASS_MEAN` summarises :func:`class_mean_rows`.

    Returns:
        ``{model: {postprocessing: {class: {"n_cases", "n_empty_pred", "n_empty_gt", metric: {"mean", "std", "n"}}}}}``
        (class as a string, JSON style; ``"mean"`` after the classes).
    """
    groups: dict[tuple, list[Mapping]] = {}
    for r in [*rows, *class_mean_rows(rows)]:
        groups.setdefault((r["model"], r["postprocessing"], str(r["class"])), []).append(r)
    out: dict = {}
    for (model, post, cls), rs in groups.items():
        entry = {
            "n_cases": len(rs),
            "n_empty_pred": sum(bool(r["empty_pred"]) for r in rs),
            "n_empty_gt": sum(bool(r["empty_gt"]) for r in rs),
        }
        entry.update({k: _stats(float(r[k]) for r in rs) for k in METRIC_KEYS})
        out.setdefault(model, {}).setdefault(post, {})[cls] = entry
    return out
