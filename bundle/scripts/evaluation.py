"""Evaluation of the dual network: the field's metrics, sliding-window protocols and the evaluation loop.

- Metrics (:func:`binary_metrics`, :func:`segmentation_metrics`): Dice, Jaccard, 95 % Hausdorff
  distance and average surface distance with the definitions of ``medpy.metric.binary`` (which the
  field's tables use), in voxels and in millimetres, plus MONAI's symmetric average surface
  distance in millimetres. Empty masks give NaN distances and are counted, not scored 0.
- :func:`keep_largest_component`: largest-connected-component post-processing.
- :func:`field_inferer` / :func:`fast_inferer`: MONAI ``SlidingWindowInferer`` set up as the field's
  protocol (UA-MT ``test_single_case``: fixed strides, symmetric zero padding, plain averaging) or
  as a faster one (50 % overlap, Gaussian blending, batched windows).
- :func:`evaluate`: runs a protocol for the ensemble and each network over a data loader and writes
  ``metrics.csv``, ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data.utils import affine_to_spacing
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms.utils import get_largest_connected_component_mask, has_measure
from scipy import ndimage
from tqdm import tqdm

from .labels import class_names

__all__ = [
    "METRIC_KEYS",
    "MODEL_NAMES",
    "surface_voxels",
    "surface_distances",
    "binary_metrics",
    "segmentation_metrics",
    "keep_largest_component",
    "field_overlap",
    "field_inferer",
    "fast_inferer",
    "protocol_inferer",
    "SoftmaxOutput",
    "disagreement_score",
    "model_variants",
    "load_weights",
    "summarize",
    "evaluate",
]

METRIC_KEYS = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm", "assd_mm")
MODEL_NAMES = ("ensemble", "net_a", "net_b")
POSTPROCESSING = ("none", "lcc")

EMPTY_RULE = (
    "A case whose prediction or ground truth is empty for a class is scored with Dice/Jaccard as usual "
    "(0 if one mask is empty, 1 if both are) and NaN distances; distance means and standard deviations "
    "are over the cases with both masks non-empty, and the number of empty predictions is reported. "
    "(The field's released evaluation code scores 0 for every metric on an empty prediction, which makes "
    "distances look better; this evaluation does not.)"
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


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# sliding-window protocols
# ----------------------------------------------------------------------------------------------


def field_overlap(roi_size: Sequence[int], strides: Sequence[int]) -> tuple[float, ...]:
    """
    Per-dimension ``overlap`` for which MONAI's sliding window steps by exactly ``strides``.

    MONAI's scan interval is ``int(roi * (1 - overlap))``; ``overlap = 1 - (stride + 0.5) / roi``
    makes it ``int(stride + 0.5) = stride`` despite rounding (``stride == roi`` gives overlap 0).
    With that interval MONAI's window starts are the field's ``min(stride * i, size - roi)``,
    ``i = 0 .. ceil((size - roi) / stride)``.

    Raises:
        ValueError: lengths differ or a stride is not in ``[1, roi]``.
    """
    if len(roi_size) != len(strides):
        raise ValueError(f"roi_size {tuple(roi_size)} and strides {tuple(strides)} must have the same length.")
    if any(not 1 <= int(s) <= int(r) for r, s in zip(roi_size, strides)):
        raise ValueError(
            f"every stride must be in [1, roi size]; found strides {tuple(strides)} for roi {tuple(roi_size)}."
        )
    return tuple(0.0 if int(s) == int(r) else 1.0 - (int(s) + 0.5) / int(r) for r, s in zip(roi_size, strides))


def field_inferer(
    roi_size: Sequence[int], strides: Sequence[int], sw_batch_size: int = 1, **kwargs
) -> SlidingWindowInferer:
    """
    The field's sliding-window protocol (UA-MT ``test_single_case``) as a MONAI ``SlidingWindowInferer``:
    windows of ``roi_size`` every ``strides`` voxels (the last window flush with the volume end),
    volumes smaller than the window zero-padded symmetrically (the extra voxel after), overlapping
    windows averaged with equal weights, output cropped back to the input's shape.

    Args:
        roi_size: window size (LA: 112x112x80; Pancreas / BraTS: 96^3).
        strides: step per dimension (LA: 18, 18, 4; Pancreas / BraTS: 16).
        sw_batch_size: windows per forward pass (1 as in the field; the result does not depend on it).
        kwargs: other ``SlidingWindowInferer`` arguments (e.g. ``sw_device``, ``device``).
    """
    return SlidingWindowInferer(
        roi_size=list(roi_size),
        sw_batch_size=sw_batch_size,
        overlap=field_overlap(roi_size, strides),
        mode="constant",
        padding_mode="constant",
        cval=0.0,
        **kwargs,
    )


def fast_inferer(
    roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 4, **kwargs
) -> SlidingWindowInferer:
    """
    The faster protocol: MONAI ``SlidingWindowInferer`` with ``overlap`` and Gaussian blending.

    Args:
        roi_size: window size.
        overlap: fraction of overlap between neighbouring windows.
        sw_batch_size: windows per forward pass.
        kwargs: other ``SlidingWindowInferer`` arguments.
    """
    return SlidingWindowInferer(
        roi_size=list(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian", **kwargs
    )


def protocol_inferer(
    protocol: str,
    roi_size: Sequence[int],
    strides: Sequence[int] | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
) -> SlidingWindowInferer:
    """
    The inferer of an evaluation protocol: ``"field"`` (:func:`field_inferer` with ``strides``, one
    window a pass) or ``"fast"`` (:func:`fast_inferer` with ``overlap`` and ``sw_batch_size``).

    Raises:
        ValueError: an unknown protocol, or ``"field"`` without ``strides``.
    """
    if protocol == "field":
        if strides is None:
            raise ValueError("the field protocol needs strides (sw_strides).")
        return field_inferer(roi_size, strides)
    if protocol == "fast":
        return fast_inferer(roi_size, overlap=overlap, sw_batch_size=sw_batch_size)
    raise ValueError(f"unknown protocol {protocol!r}; expected 'field' or 'fast'.")


class SoftmaxOutput(nn.Module):
    """Wrap a network so that it returns ``softmax(net(x), dim)``: inferers then average probabilities.

    Args:
        net: a network returning logits.
        dim: the class dimension.
    """

    def __init__(self, net: nn.Module, dim: int = 1):
        super().__init__()
        self.net = net
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=self.dim)


def disagreement_score(uncertainty: torch.Tensor, margin: int = 3) -> float:
    """
    One number for how unsure a dual network is about an image: the mean disagreement ``D`` (symmetric
    KL between the two networks, :func:`monai_dualssl.networks.ensemble_uncertainty`) over the region
    ``R`` = predicted foreground (argmax of ``p`` > 0) dilated by ``margin`` voxels (a cube), or over the
    whole image when nothing is predicted: ``score = sum_{v in R} D_v / |R|``.

    Args:
        uncertainty: ``DualNet(output="uncertainty")`` output of one image, ``[1, C + 2, *spatial]``.
        margin: dilation of the predicted foreground, in voxels.

    Raises:
        ValueError: for a batch of more than one image or fewer than 4 channels.
    """
    if uncertainty.dim() < 3 or uncertainty.shape[0] != 1 or uncertainty.shape[1] < 4:
        raise ValueError(f"expected an uncertainty map [1, C + 2, *spatial] with C >= 2, found {tuple(uncertainty.shape)}.")
    num_classes = uncertainty.shape[1] - 2
    region = (uncertainty[:, :num_classes].argmax(dim=1, keepdim=True) > 0).float()
    if margin > 0:
        pool = (None, F.max_pool1d, F.max_pool2d, F.max_pool3d)[region.dim() - 2]
        region = pool(region, 2 * margin + 1, stride=1, padding=margin)
    disagreement = uncertainty[:, num_classes + 1 : num_classes + 2]
    if not bool(region.any()):
        return float(disagreement.mean())
    return float((disagreement * region).sum() / region.sum())


def model_variants(network: nn.Module, names: Sequence[str] = MODEL_NAMES) -> dict[str, nn.Module]:
    """
    The probability-returning models to evaluate: ``"ensemble"`` is ``network`` itself (a ``DualNet``
    returning the mean softmax; with ``output="logits"`` its softmax, which is that mean again),
    ``"net_a"`` / ``"net_b"`` the softmax of ``network.net_a`` / ``network.net_b``.

    Raises:
        ValueError: an unknown name, a name the network has no sub-network for, or an ensemble whose
            ``output`` mode is neither ``"prob"`` nor ``"logits"``.
    """
    out = {}
    for name in names:
        if name == "ensemble":
            mode = getattr(network, "output", "prob")
            if mode not in ("prob", "logits"):
                raise ValueError(f"the ensemble must return probabilities; set output='prob' (found output={mode!r}).")
            out[name] = SoftmaxOutput(network) if mode == "logits" else network
        elif name in ("net_a", "net_b") and isinstance(getattr(network, name, None), nn.Module):
            out[name] = SoftmaxOutput(getattr(network, name))
        else:
            raise ValueError(f"unknown model {name!r} for {type(network).__name__}; expected some of {MODEL_NAMES}.")
    return out


def load_weights(network: nn.Module, ckpt_path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """
    Load a checkpoint into ``network`` with ``torch.load(..., weights_only=True)``.

    Accepts a plain state_dict of the network (``models/model.pt``; half-precision tensors are cast to
    float32) or a full training checkpoint holding ``network_a`` and ``network_b`` (``best.pt``,
    ``final.pt``), whose weights go to ``net_a`` / ``net_b``.

    Args:
        network: the network (``DualNet``) to load into.
        ckpt_path: checkpoint file.
        strict: passed to ``load_state_dict``.

    Returns:
        ``network``.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ValueError: the file holds no state_dict, or its keys or shapes do not fit ``network``.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first, or set ckpt_path).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and {"network_a", "network_b"} <= set(state):
        parts = (("net_a", "network_a"), ("net_b", "network_b"))
        state = {f"{net}.{k}": v for net, key in parts for k, v in state[key].items()}
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state_dict, found {type(state).__name__}.")
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit {type(network).__name__}: {e}") from e
    return network


# ----------------------------------------------------------------------------------------------
# evaluation loop
# ----------------------------------------------------------------------------------------------


def _case_name(image: torch.Tensor, index: int) -> str:
    """``<parent folder>/<file name>`` of the image, or ``case_<index>`` without metadata."""
    name = getattr(image, "meta", {}).get("filename_or_obj")
    name = name[0] if isinstance(name, (list, tuple)) and name else name
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return f"case_{index:03d}"
    path = Path(name)
    return f"{path.parent.name}/{path.name}"


def _spacing(image: torch.Tensor, default: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Voxel size of a (batched) image from its affine, else ``default``, else 1."""
    affine = getattr(image, "affine", None)
    if default is None and affine is not None:
        affine = affine[0] if affine.ndim == 3 else affine
        return tuple(float(s) for s in affine_to_spacing(affine, r=ndim))
    return tuple(float(s) for s in (default if default is not None else (1.0,) * ndim))


def _infer(model: nn.Module, inferer: Inferer, image: torch.Tensor, device: torch.device, amp: bool):
    """Class probabilities ``[1, C, ...]`` of one ``[1, C_in, ...]`` image and the seconds they took."""
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        probs = inferer(image.to(device), model).float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return probs, time.perf_counter() - start


def _predict_all(variants: Mapping[str, nn.Module], inferer: Inferer, image, device, amp) -> dict:
    """
    ``{name: (argmax labels, number of classes, seconds)}`` of every variant on one image. When both
    networks are evaluated, the ensemble is the mean of their probabilities at the sum of their times:
    window averaging is linear, so this equals windowing the mean-softmax ensemble, at half the cost.
    """
    derive = "ensemble" in variants and {"net_a", "net_b"} <= variants.keys()
    probs = {n: _infer(m, inferer, image, device, amp) for n, m in variants.items() if not (derive and n == "ensemble")}
    if derive:
        (p_a, s_a), (p_b, s_b) = probs["net_a"], probs["net_b"]
        probs["ensemble"] = ((p_a + p_b) / 2, s_a + s_b)
    return {n: (probs[n][0].argmax(dim=1)[0].cpu().numpy(), int(probs[n][0].shape[1]), probs[n][1]) for n in variants}


def _case_rows(
    case: str, model: str, pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing, seconds: float
) -> list[dict]:
    """Metric rows of one case and model, without and with largest-component post-processing."""
    rows = []
    for post in POSTPROCESSING:
        labels = keep_largest_component(pred, num_classes) if post == "lcc" else pred
        for m in segmentation_metrics(labels, gt, num_classes, spacing):
            rows.append({"case": case, "model": model, "postprocessing": post, **m,
                         "spacing": " ".join(f"{s:g}" for s in spacing), "seconds": seconds})
    return rows


def _stats(values: Iterable[float]) -> dict:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if not v.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def summarize(rows: Sequence[Mapping]) -> dict:
    """
    Mean and (population, ``ddof=0``) standard deviation of every metric over cases, per model,
    post-processing and class, ignoring NaN (empty-mask) distances.

    Returns:
        ``{model: {postprocessing: {class: {"n_cases", "n_empty_pred", "n_empty_gt", metric: {"mean", "std", "n"}}}}}``
        (class as a string, JSON style).
    """
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
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


def _describe(inferer: Inferer) -> dict:
    """The inferer's settings, with its scan interval (the effective stride) per dimension."""
    desc: dict = {"type": type(inferer).__name__}
    for key in ("roi_size", "overlap", "mode", "sw_batch_size"):
        value = getattr(inferer, key, None)
        desc[key] = list(value) if isinstance(value, (tuple, list)) else (str(value) if key == "mode" else value)
    if isinstance(inferer, SlidingWindowInferer):
        roi = list(inferer.roi_size)
        overlap = inferer.overlap if isinstance(inferer.overlap, Sequence) else [inferer.overlap] * len(roi)
        desc["scan_interval"] = [max(int(r * (1 - o)), 1) for r, o in zip(roi, overlap)]
    return desc


def _fmt(stat: Mapping, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean'] * scale:.2f} ± {stat['std'] * scale:.2f}"


def _markdown(summary: Mapping) -> str:
    """Markdown table of a summary (Dice and Jaccard in %)."""
    lines = [
        f"# Evaluation ({summary['protocol']} protocol, {summary['num_cases']} cases)",
        "",
        f"Inferer: `{json.dumps(summary['inferer'])}`. Space: {summary['space']}.",
        "",
        "| model | post-processing | class | cases | empty pred | Dice % | Jaccard % | 95HD (vox) | ASD (vox) "
        "| 95HD (mm) | ASD (mm) | ASSD (mm) | s / volume |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, posts in summary["metrics"].items():
        for post, classes in posts.items():
            for cls, e in classes.items():
                cls = summary.get("class_names", {}).get(cls, cls)
                cells = [_fmt(e["dice"], 100), _fmt(e["jaccard"], 100)] + [_fmt(e[k]) for k in METRIC_KEYS[2:]]
                lines.append(f"| {model} | {post} | {cls} | {e['n_cases']} | {e['n_empty_pred']} | "
                             + " | ".join(cells) + f" | {summary['seconds_per_volume'][model]:.2f} |")
    lines += ["", "Mean ± standard deviation (ddof=0) over cases. " + EMPTY_RULE, ""]
    return "\n".join(lines)


def _named(row: Mapping, names: Mapping[int, str]) -> dict:
    """``row`` with a ``class_name`` column after ``class``."""
    out = {}
    for key, value in row.items():
        out[key] = value
        if key == "class":
            out["class_name"] = names[int(value)]
    return out


def _write(output_dir: Path, rows: Sequence[Mapping], summary: Mapping) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "summary.md").write_text(_markdown(summary))


def evaluate(
    network: nn.Module,
    dataloader: Iterable[Mapping],
    inferer: Inferer,
    output_dir: str | os.PathLike,
    models: Sequence[str] = MODEL_NAMES,
    device: str | torch.device | None = None,
    protocol: str = "",
    amp: bool = False,
    pixdim: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    progress: bool = True,
    label_names: Mapping[str, int] | None = None,
) -> dict:
    """
    Evaluate the ensemble and each network of ``network`` (a ``DualNet``) on every case of
    ``dataloader`` and write ``metrics.csv`` (one row per case, model, post-processing and
    foreground class), ``summary.json`` and ``summary.md`` into ``output_dir``.

    Every case is predicted with ``inferer`` (see :func:`field_inferer`, :func:`fast_inferer`), argmax
    over the averaged probabilities, then scored (:func:`segmentation_metrics`) as predicted
    (``postprocessing="none"``) and after :func:`keep_largest_component` (``"lcc"``). Metrics are
    computed on the preprocessed grid of the loader (after any resampling); the millimetre spacing
    is read from each preprocessed image's affine. Inference time per volume (argmax and
    metrics excluded) is measured with ``time.perf_counter``.

    Args:
        network: the dual network, with weights loaded.
        dataloader: iterable of ``{image_key: [1, C, ...], label_key: [1, 1, ...]}`` batches of one case
            (a MONAI ``DataLoader`` with ``batch_size=1``); images keep their metadata (``MetaTensor``)
            for case names and spacing.
        inferer: the protocol's inferer.
        output_dir: folder for the outputs (created).
        models: some of ``"ensemble"``, ``"net_a"``, ``"net_b"``.
        device: where to run (None: the network's device).
        protocol: protocol name recorded in the summary.
        amp: run the networks under autocast.
        pixdim: the preprocessing's resampling voxel size (recorded in the summary; 0 entries keep
            the input's voxel size).
        spacing: voxel size for the millimetre metrics, overriding the images' affines.
        image_key: batch key of the image.
        label_key: batch key of the label.
        progress: show a tqdm progress bar.
        label_names: ``{name: label value}`` of the foreground classes (the config's ``label_names``): the
            ``class_name`` column of ``metrics.csv``, the ``class_names`` of the summary and the class column
            of ``summary.md``; None names them ``class_<value>``.

    Returns:
        the summary written to ``summary.json``.

    Raises:
        ValueError: a batch holds more than one case, the label shape differs from the image's, or
            the loader is empty.
    """
    device = torch.device(device) if device is not None else next(network.parameters()).device
    variants = model_variants(network, models)
    network.eval()
    rows: list[dict] = []
    seconds: dict[str, list[float]] = {m: [] for m in variants}
    spacings = set()
    for index, batch in enumerate(tqdm(dataloader, desc=f"evaluating ({protocol or 'inferer'})", disable=not progress)):
        image, label = batch[image_key], batch[label_key]
        if image.shape[0] != 1:
            raise ValueError(f"expected batches of one case, found a batch of {image.shape[0]} (use batch_size=1).")
        case = _case_name(image, index)
        gt = np.asarray(label[0, 0].cpu().numpy()).astype(np.int64)
        if gt.shape != tuple(image.shape[2:]):
            raise ValueError(
                f"case '{case}': label shape {gt.shape} differs from image shape {tuple(image.shape[2:])}."
            )
        vox = _spacing(image, spacing, gt.ndim)
        spacings.add(vox)
        for name, (pred, num_classes, sec) in _predict_all(variants, inferer, image, device, amp).items():
            seconds[name].append(sec)
            rows += _case_rows(case, name, pred, gt, num_classes, vox, sec)
    if not rows:
        raise ValueError("the data loader yielded no case to evaluate.")
    names = class_names(label_names) if label_names else {0: "background"}
    names.update({int(r["class"]): f"class_{r['class']}" for r in rows if int(r["class"]) not in names})
    rows = [_named(r, names) for r in rows]
    resampled = pixdim is not None and any(float(p) > 0 for p in pixdim)
    grid = f"resampled by the preprocessing to pixdim {list(pixdim)} mm" if resampled else "the images' own voxel grid"
    summary = {
        "protocol": protocol,
        "inferer": _describe(inferer),
        "num_cases": index + 1,
        "models": list(variants),
        "postprocessing": {"none": "argmax", "lcc": "argmax, then the largest connected component per class"},
        "space": grid + "; distances in voxels count voxels of that grid, distances in mm use its spacing",
        "spacings_mm": sorted(list(s) for s in spacings),
        "empty_cases": EMPTY_RULE,
        "metric_definitions": METRIC_NOTES,
        "std": "population standard deviation over cases (ddof=0)",
        "seconds_per_volume": {m: float(np.mean(v)) for m, v in seconds.items()},
        "class_names": {str(c): n for c, n in names.items() if c > 0},
        "metrics": summarize(rows),
    }
    _write(Path(output_dir), rows, summary)
    return summary
