"""Pictures of the bundle's results: per-case slice montages and training curves.

- :func:`save_montage`: a PNG of a few axial slices through the foreground, with the ground-truth
  contour, the predicted segmentation and an uncertainty heat map.
- :func:`montages_from_folder`: one montage per case from the outputs of ``inference.json``
  (``<name>_seg.nii.gz``, ``<name>_entropy.nii.gz``) and the input images.
- :func:`plot_training_curves`: loss terms, learning rates and validation Dice from the TensorBoard
  event files written by ``train.yaml``.

matplotlib is used through its Agg canvas only (no ``pyplot``, no global backend change) and is
imported when a picture is drawn, so importing the package stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .labels import class_names

__all__ = ["save_montage", "montages_from_folder", "plot_training_curves"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".h5", ".hdf5")
#: prediction fill colour of label value ``c`` (1, 2, ...): ``CLASS_COLOURS[(c - 1) % 8]``
CLASS_COLOURS = ("red", "dodgerblue", "gold", "magenta", "cyan", "orange", "lime", "white")
SEG_POSTFIX = "_seg"


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"save_montage: {name} must be [H, W, D] or [C, H, W, D], found shape {x.shape}.")
    return x


def _volume(x, name: str, reduce: str) -> np.ndarray:
    """``[H, W, D]`` from ``[H, W, D]`` or ``[C, H, W, D]``: the first channel, or the argmax over channels."""
    x = _to_numpy(x, name)
    if x.ndim == 4:
        x = x[0] if x.shape[0] == 1 or reduce == "first" else np.argmax(x, axis=0)
    return x


def _pick_slices(masks: Sequence[np.ndarray], depth: int, num_slices: int) -> list[int]:
    """``num_slices`` indices along the last axis, evenly spread over the slices holding foreground
    in any of ``masks`` (over the whole depth when there is none)."""
    occupied = np.zeros(depth, dtype=bool)
    for m in masks:
        occupied |= np.any(m > 0, axis=(0, 1))
    candidates = np.flatnonzero(occupied) if occupied.any() else np.arange(depth)
    n = min(num_slices, len(candidates))
    positions = np.linspace(0, len(candidates) - 1, n + 2)[1:-1] if len(candidates) > n else np.arange(n)
    return sorted({int(candidates[int(round(p))]) for p in positions})


def save_montage(
    image,
    pred,
    out_png: str | os.PathLike,
    label=None,
    uncertainty=None,
    num_slices: int = 4,
    title: str | None = None,
    uncertainty_name: str = "entropy",
    label_names: dict[str, int] | None = None,
) -> str:
    """
    Save a PNG montage of ``num_slices`` axial slices (the last spatial axis) chosen evenly among the
    slices that hold foreground in ``pred`` or ``label``. The first row shows the image with the
    prediction as a translucent overlay (one colour per class: red, blue, gold, ... for 1, 2, 3, ...) and
    the ground truth as contours (green for a single class; with several classes each class's contour in
    its own colour, so touching structures stay apart), with a legend naming each class by
    ``label_names``; the second row, when
    ``uncertainty`` is given, shows the uncertainty as a heat map over the image with a colour bar.

    Slices are drawn with the first array axis horizontal and the second vertical (origin at the
    bottom left), i.e. as seen from the feet for RAS-oriented volumes.

    Args:
        image: intensity volume ``[H, W, D]`` or ``[C, H, W, D]`` (the first channel is shown),
            numpy array or tensor.
        pred: segmentation ``[H, W, D]`` or ``[1, H, W, D]`` (class indices) or class scores
            ``[C, H, W, D]`` (C > 1: argmax is taken).
        out_png: file to write; parent folders are created.
        label: optional ground truth, same forms as ``pred``.
        uncertainty: optional voxel-wise uncertainty ``[H, W, D]`` or ``[1, H, W, D]``.
        num_slices: number of slices (columns); fewer when the volume has fewer slices.
        title: figure title (default: the file name of ``out_png``).
        uncertainty_name: caption of the uncertainty row.
        label_names: ``{name: label value}`` of the foreground classes (the config's ``label_names``) for the
            legend; None names them ``class <value>``.

    Returns:
        ``out_png`` as a string.

    Raises:
        ValueError: when an array has the wrong rank, the spatial shapes differ or ``num_slices < 1``.
        ConfigError: ``label_names`` is not a valid ``{name: value}`` dict (see :func:`class_names`).
    """
    if num_slices < 1:
        raise ValueError(f"save_montage: num_slices must be >= 1, found {num_slices}.")
    img = _volume(image, "image", "first").astype(np.float32)
    seg = _volume(pred, "pred", "argmax")
    gt = None if label is None else _volume(label, "label", "argmax")
    unc = None if uncertainty is None else _volume(uncertainty, "uncertainty", "first").astype(np.float32)
    for name, arr in (("pred", seg), ("label", gt), ("uncertainty", unc)):
        if arr is not None and arr.shape != img.shape:
            raise ValueError(
                f"save_montage: {name} spatial shape {tuple(arr.shape)} differs from image spatial shape {img.shape}."
            )

    names = class_names(label_names) if label_names else {}

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    slices = _pick_slices([seg] + ([gt] if gt is not None else []), img.shape[-1], num_slices)
    rows = 2 if unc is not None else 1
    fig = Figure(figsize=(3.0 * len(slices), 3.2 * rows + 0.4), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, len(slices), squeeze=False))
    lo, hi = (float(v) for v in np.percentile(img, (0.5, 99.5)))
    n_classes = int(max(seg.max(), 0 if gt is None else gt.max(), 1))
    present = {int(c) for c in np.unique(seg) if c > 0}
    present |= {int(c) for c in np.unique(gt) if c > 0} if gt is not None else set()
    shown = sorted((set(names) - {0}) | present)
    colour_of = lambda c: CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]  # noqa: E731
    truth_colour = colour_of if len(shown) > 1 else (lambda c: "lime")  # several classes: each its own contour colour
    colours = ListedColormap(CLASS_COLOURS)
    u_max = float(unc.max()) if unc is not None and unc.max() > 0 else 1.0
    heat = None
    for j, z in enumerate(slices):
        ax = axes[0, j]
        ax.imshow(img[..., z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        s = seg[..., z].T
        fill = np.ma.masked_where(s <= 0, (s.astype(np.int64) - 1) % len(CLASS_COLOURS))
        ax.imshow(fill, cmap=colours, vmin=0, vmax=len(CLASS_COLOURS) - 1, alpha=0.4, origin="lower")
        if gt is not None:
            g = gt[..., z].T
            for c in range(1, n_classes + 1):
                if (g == c).any():
                    ax.contour((g == c).astype(float), levels=[0.5], colors=[truth_colour(c)], linewidths=1.0,
                               origin="lower")
        ax.set_title(f"slice {z}", fontsize=9)
        if unc is not None:
            ax_u = axes[1, j]
            ax_u.imshow(img[..., z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            heat = ax_u.imshow(unc[..., z].T, cmap="inferno", vmin=0.0, vmax=u_max, alpha=0.7, origin="lower")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles: list = [Patch(facecolor=colour_of(c), alpha=0.6) for c in shown]
    labels = [names.get(c, f"class {c}") for c in shown]
    if gt is not None:  # one short line per contour colour
        contour_colours = dict.fromkeys(map(truth_colour, shown or [1]))
        handles.append(tuple(Line2D([], [], color=colour, lw=1.0) for colour in contour_colours))
        labels.append("ground truth")
    if handles:
        axes[0, -1].legend(handles, labels, loc="upper right", fontsize=7, framealpha=0.7,
                           handler_map={tuple: HandlerTuple(ndivide=None)})
    truth = ", truth (green)" if len(shown) <= 1 else ", truth (contours)"
    axes[0, 0].set_ylabel("prediction (fill)" + (truth if gt is not None else ""), fontsize=9)
    if unc is not None:
        axes[1, 0].set_ylabel(uncertainty_name, fontsize=9)
        fig.colorbar(heat, ax=list(axes[1]), shrink=0.8, label=uncertainty_name)
    out_png = Path(out_png)
    fig.suptitle(title if title is not None else out_png.name, fontsize=10)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return str(out_png)


def _load(path: Path, h5_dataset: str) -> np.ndarray:
    """Channel-first array of ``path`` read as inference reads it (h5: ``H5Reader(dataset=h5_dataset)``)."""
    from monai.transforms import LoadImage

    from .readers import H5Reader

    if path.is_file() and path.name.lower().endswith((".h5", ".hdf5")):
        loader = LoadImage(reader=H5Reader(dataset=h5_dataset), image_only=True, ensure_channel_first=True)
    else:
        loader = LoadImage(image_only=True, ensure_channel_first=True)
    return np.asarray(loader(str(path)))


def _find(root: Path, rel: Path, stem: str, suffixes: Sequence[str]) -> Path | None:
    """``root/rel/stem<suffix>`` for the first suffix that exists, else the folder ``root/rel/stem`` (a
    DICOM series), else None."""
    for suffix in suffixes:
        candidate = root / rel / (stem + suffix)
        if candidate.is_file():
            return candidate
    folder = root / rel / stem
    return folder if folder.is_dir() else None


def montages_from_folder(
    output_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    num_slices: int = 4,
    uncertainty: str | None = "entropy",
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
    label_names: dict[str, int] | None = None,
) -> list[str]:
    """
    Write one montage (:func:`save_montage`) per segmentation written by ``inference.json``.

    Every ``<rel>/<name>_seg.nii.gz`` under ``output_dir`` is matched with the input image
    ``image_dir/<rel>/<name><suffix>`` (the layout inference keeps), the optional ground truth
    ``label_dir/<rel>/<name><suffix>`` (for h5 files the ``label`` dataset; ``label_dir`` may equal
    ``image_dir``) and the uncertainty map ``<rel>/<name>_<uncertainty>.nii.gz``. The montage is
    ``out_dir/<rel>/<name>_montage.png``.

    Args:
        output_dir: the inference output folder.
        image_dir: the folder inference read the images from (``data_root_dir`` of its ``SaveImaged``,
            or the parent folder of a single input file).
        label_dir: optional folder of ground-truth labels with the same names.
        out_dir: where to write the PNGs (default: ``output_dir``).
        num_slices: slices per montage.
        uncertainty: postfix of the uncertainty map to show (``"entropy"``, ``"disagreement"``) or None.
        suffixes: file name endings tried for images and labels.
        label_names: ``{name: label value}`` of the foreground classes, for the legends.

    Returns:
        the paths of the PNG files written, in sorted case order.

    Raises:
        FileNotFoundError: ``output_dir`` holds no ``*_seg.nii.gz`` or a case's image is missing (named).
    """
    output_dir, image_dir = Path(output_dir), Path(image_dir)
    out_dir = output_dir if out_dir is None else Path(out_dir)
    segs = sorted(output_dir.rglob(f"*{SEG_POSTFIX}.nii.gz"))
    if not segs:
        raise FileNotFoundError(f"no '*{SEG_POSTFIX}.nii.gz' segmentation found under {output_dir}.")
    written = []
    for seg_path in segs:
        rel = seg_path.parent.relative_to(output_dir)
        stem = seg_path.name[: -len(f"{SEG_POSTFIX}.nii.gz")]
        image_path = _find(image_dir, rel, stem, suffixes)
        if image_path is None:
            raise FileNotFoundError(
                f"{seg_path}: no input image '{stem}' ({', '.join(suffixes)} or a DICOM folder) in {image_dir / rel}."
            )
        label_path = None if label_dir is None else _find(Path(label_dir), rel, stem, suffixes)
        unc_path = None if uncertainty is None else seg_path.with_name(f"{stem}_{uncertainty}.nii.gz")
        unc = _load(unc_path, "") if unc_path is not None and unc_path.is_file() else None
        written.append(
            save_montage(
                _load(image_path, "image"),
                _load(seg_path, ""),
                out_dir / rel / f"{stem}_montage.png",
                label=None if label_path is None else _load(label_path, "label"),
                uncertainty=unc,
                num_slices=num_slices,
                title=str(rel / stem) if str(rel) != "." else stem,
                uncertainty_name=uncertainty or "",
                label_names=label_names,
            )
        )
    return written


def _read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in the event files under ``log_dir`` (files in name
    order, i.e. time order; a step written twice, as after a resume, keeps the later value)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    files = sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda p: (p.name, str(p)))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file (events.out.tfevents.*) found under {log_dir}.")
    scalars: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            scalars.setdefault(tag, {}).update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    return scalars


# panels of plot_training_curves: (title, rule), the first matching rule wins
_PANELS = (
    ("total loss", lambda t: t == "loss"),
    ("supervised terms", lambda t: t.startswith(("ce_", "dice_", "corr_"))),
    ("unlabeled terms", lambda t: t.startswith("loss_")),
    ("loss weights", lambda t: t.startswith("w_")),
    ("learning rate", lambda t: t == "lr" or t.startswith("lr_")),
    ("validation", lambda t: t.startswith("val_") or "dice" in t.lower()),
)


def _ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average (debiased, so the first point is not pulled to 0)."""
    out, last = [], 0.0
    for i, v in enumerate(values, start=1):
        last = weight * last + (1.0 - weight) * v
        out.append(last / (1.0 - weight**i))
    return out


def plot_training_curves(
    log_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    epoch_length: int | None = None,
    smoothing: float = 0.9,
) -> str:
    """
    Plot the scalars of a training run's TensorBoard event files into one PNG of subplots: total
    loss, supervised terms (``ce_*``, ``dice_*``, ``corr_*``), unlabeled terms (``loss_cps``,
    ``loss_proto``, ``loss_cos``), ramped loss weights (``w_*``), learning rates (``lr_*``, log
    scale) and validation metrics (``val_mean_dice``); any other tag gets an "other" panel.

    ``train.yaml`` writes every key of the trainer output as its own tag at each iteration
    (MONAI's ``TensorBoardStatsHandler`` with a dict output) and ``val_mean_dice`` once per
    validation, at the trainer epoch.

    Args:
        log_dir: folder holding the event files (searched recursively), e.g. ``bundle/runs/demo``.
        out_png: file to write; parent folders are created.
        epoch_length: iterations per epoch of the run; if given, validation steps (epochs) are
            converted to iterations so all panels share the iteration axis.
        smoothing: weight in ``[0, 1)`` of the exponential moving average drawn over noisy series (losses) of 20
            points or more (the raw values stay visible, faint); 0 draws the raw values only.

    Returns:
        ``out_png`` as a string.

    Raises:
        FileNotFoundError: no event file under ``log_dir``.
        ValueError: the event files hold no scalar, or ``smoothing`` is outside ``[0, 1)``.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"plot_training_curves: smoothing must be in [0, 1), found {smoothing}.")
    log_dir = Path(log_dir)
    scalars = _read_scalars(log_dir)
    if not scalars:
        raise ValueError(f"the TensorBoard event files under {log_dir} hold no scalar.")
    panels: dict[str, list[str]] = {}
    for tag in sorted(scalars):
        title = next((name for name, rule in _PANELS if rule(tag)), "other")
        panels.setdefault(title, []).append(tag)
    order = [name for name, _ in _PANELS if name in panels] + (["other"] if "other" in panels else [])

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(order))
    rows = -(-len(order) // cols)
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, title in zip(axes, order):
        to_iterations = title == "validation" and epoch_length is not None
        for tag in panels[title]:
            steps = sorted(scalars[tag])
            x = [s * epoch_length for s in steps] if to_iterations else steps
            y = [scalars[tag][s] for s in steps]
            if smoothing > 0 and len(y) >= 20 and title not in ("learning rate", "loss weights"):
                (raw,) = ax.plot(x, y, alpha=0.25, lw=0.8)
                ax.plot(x, _ema(y, smoothing), color=raw.get_color(), label=tag)
            else:
                ax.plot(x, y, label=tag, marker="o" if len(steps) < 30 else None, ms=3)
        if title == "learning rate" and all(v > 0 for t in panels[title] for v in scalars[t].values()):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        validation_axis = "epoch" if title == "validation" and not to_iterations else "iteration"
        ax.set_xlabel(validation_axis, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(order) :]:
        ax.set_visible(False)
    out_png = Path(out_png)
    fig.suptitle(f"training curves: {log_dir.name}", fontsize=11)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return str(out_png)
