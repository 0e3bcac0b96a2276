"""Evaluation of the dual network: the evaluation loop and its reports.

- :func:`evaluate`: runs a protocol (:mod:`monai_dualssl.inference`) for the ensemble and each network
  over a data loader, scores every case (:mod:`monai_dualssl.metrics`) and writes ``metrics.csv``,
  ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.data.utils import affine_to_spacing
from monai.inferers import Inferer, SlidingWindowInferer
from tqdm import tqdm

from .inference import MODEL_NAMES, frozen_for_cpu, model_variants
from .labels import class_names
from .metrics import (
    CLASS_MEAN,
    CLASS_MEAN_RULE,
    EMPTY_RULE,
    METRIC_KEYS,
    METRIC_NOTES,
    keep_largest_component,
    segmentation_metrics,
    summarize,
)

__all__ = ["evaluate"]

POSTPROCESSING = ("none", "lcc")


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
                n = len(classes) - 1
                cls = f"mean of {n}" if cls == CLASS_MEAN else summary.get("class_names", {}).get(cls, cls)
                cells = [_fmt(e["dice"], 100), _fmt(e["jaccard"], 100)] + [_fmt(e[k]) for k in METRIC_KEYS[2:]]
                lines.append(f"| {model} | {post} | {cls} | {e['n_cases']} | {e['n_empty_pred']} | "
                             + " | ".join(cells) + f" | {summary['seconds_per_volume'][model]:.2f} |")
    lines += ["", "Mean ± standard deviation (ddof=0) over cases. " + EMPTY_RULE, ""]
    if any(CLASS_MEAN in classes for posts in summary["metrics"].values() for classes in posts.values()):
        lines[-1:-1] = ["", f"'mean of n' rows: {CLASS_MEAN_RULE}"]
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
    jit_optimize: bool = False,
) -> dict:
    """
    Evaluate the ensemble and each network of ``network`` (a ``DualNet``) on every case of
    ``dataloader`` and write ``metrics.csv`` (one row per case, model, post-processing and
    foreground class), ``summary.json`` and ``summary.md`` into ``output_dir``.

    Every case is predicted with ``inferer`` (see :func:`field_inferer`, :func:`fast_inferer`), argmax
    over the averaged probabilities, then scored (:func:`segmentation_metrics`) as predicted
    (``postprocessing="none"``) and after :func:`keep_largest_component` (``"lcc"``, per class). With
    several foreground classes the summary also holds their mean (class ``"mean"``, the summary's
    ``class_mean`` says how it is taken; ``metrics.csv`` keeps the per-class rows). Metrics are
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
        jit_optimize: on CPU without ``amp``, run each model as :func:`frozen_for_cpu` makes it (faster for
            narrow networks; recorded in the summary).

    Returns:
        the summary written to ``summary.json``.

    Raises:
        ValueError: a batch holds more than one case, the label shape differs from the image's, or
            the loader is empty.
    """
    device = torch.device(device) if device is not None else next(network.parameters()).device
    network.eval()
    variants = model_variants(network, models)
    jit_optimize = jit_optimize and device.type == "cpu" and not amp
    if jit_optimize:
        variants = {name: frozen_for_cpu(model) for name, model in variants.items()}
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
        "jit_optimize": jit_optimize,
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
    if len({r["class"] for r in rows}) > 1:  # several foreground classes: the summary has their mean
        summary["class_mean"] = CLASS_MEAN_RULE
    _write(Path(output_dir), rows, summary)
    return summary
