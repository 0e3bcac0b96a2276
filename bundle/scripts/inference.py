"""Inference with the dual network: sliding-window protocols, probability models, the uncertainty score.

- :func:`field_inferer` / :func:`fast_inferer` (:func:`protocol_inferer` by name): MONAI
  ``SlidingWindowInferer`` set up as the field's protocol (UA-MT ``test_single_case``: fixed strides,
  symmetric zero padding, plain averaging) or as a faster one (50 % overlap, Gaussian blending,
  batched windows).
- :class:`SoftmaxOutput`, :func:`model_variants`: the ensemble and each network as models returning
  probabilities.
- :func:`uncertainty_score` / :func:`disagreement_score` / :func:`expected_dice_error`: one uncertainty
  number per image from ``DualNet(output="uncertainty")``.
- :func:`load_weights`: a trained model or a training checkpoint into a ``DualNet``.
- :func:`frozen_for_cpu`: a frozen TorchScript copy of a model for CPU inference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer

__all__ = [
    "MODEL_NAMES",
    "field_overlap",
    "field_inferer",
    "fast_inferer",
    "protocol_inferer",
    "SoftmaxOutput",
    "disagreement_score",
    "expected_dice_error",
    "uncertainty_score",
    "UNCERTAINTY_MAPS",
    "model_variants",
    "frozen_for_cpu",
    "load_weights",
]

MODEL_NAMES = ("ensemble", "net_a", "net_b")


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


UNCERTAINTY_MAPS = ("entropy", "disagreement")  # the channels after the C class probabilities


def _check_one_uncertainty_map(uncertainty: torch.Tensor) -> None:
    """Refuse anything but one ``DualNet(output="uncertainty")`` output ``[1, C + 2, *spatial]``, ``C >= 2``."""
    if uncertainty.dim() < 3 or uncertainty.shape[0] != 1 or uncertainty.shape[1] < 4:
        raise ValueError(f"expected an uncertainty map [1, C + 2, *spatial] with C >= 2, found {tuple(uncertainty.shape)}.")


def uncertainty_score(uncertainty: torch.Tensor, margin: int = 3, which: str = "disagreement") -> float:
    """
    One number for how unsure a dual network is about an image: the mean of one uncertainty map of
    :func:`monai_dualssl.networks.ensemble_uncertainty` (``which``: ``"entropy"`` H of the mean softmax, or
    ``"disagreement"`` D, the symmetric KL between the two networks) over the region ``R`` = predicted
    foreground (argmax of ``p`` > 0) dilated by ``margin`` voxels (a cube), or over the whole image when
    nothing is predicted: ``score = sum_{v in R} map_v / |R|``.

    Args:
        uncertainty: ``DualNet(output="uncertainty")`` output of one image, ``[1, C + 2, *spatial]``.
        margin: dilation of the predicted foreground, in voxels.
        which: ``"entropy"`` or ``"disagreement"``.

    Raises:
        ValueError: for a batch of more than one image, fewer than 4 channels or an unknown ``which``.
    """
    _check_one_uncertainty_map(uncertainty)
    if which not in UNCERTAINTY_MAPS:
        raise ValueError(f"which must be one of {UNCERTAINTY_MAPS}, found {which!r}.")
    num_classes = uncertainty.shape[1] - 2
    region = (uncertainty[:, :num_classes].argmax(dim=1, keepdim=True) > 0).float()
    if margin > 0:
        pool = (None, F.max_pool1d, F.max_pool2d, F.max_pool3d)[region.dim() - 2]
        region = pool(region, 2 * margin + 1, stride=1, padding=margin)
    channel = num_classes + UNCERTAINTY_MAPS.index(which)
    values = uncertainty[:, channel : channel + 1]
    if not bool(region.any()):
        return float(values.mean())
    return float((values * region).sum() / region.sum())


def disagreement_score(uncertainty: torch.Tensor, margin: int = 3) -> float:
    """:func:`uncertainty_score` of the disagreement map ``D`` (the MONAI Label app's ``disagreement`` strategy)."""
    return uncertainty_score(uncertainty, margin, "disagreement")


def expected_dice_error(uncertainty: torch.Tensor) -> float:
    """
    The Dice error a dual network expects of its own segmentation, without labels: how far the mean
    softmax ``p`` is from its argmax ``pred``, per foreground class ``c``, with one voxel of smoothing
    (a class neither predicted nor given probability mass scores 0)::

        error = 1 - mean_{c >= 1} (2 sum_v p_vc [pred_v = c] + 1) / (sum_v p_vc + |{v: pred_v = c}| + 1)

    Args:
        uncertainty: ``DualNet(output="uncertainty")`` output of one image, ``[1, C + 2, *spatial]``.

    Raises:
        ValueError: for a batch of more than one image or fewer than 4 channels.
    """
    _check_one_uncertainty_map(uncertainty)
    p = uncertainty[0, : uncertainty.shape[1] - 2].flatten(1).double()  # [C, V]
    hard = F.one_hot(p.argmax(0), p.shape[0]).T.to(p.dtype)
    dice = (2 * (p * hard).sum(1) + 1) / (p.sum(1) + hard.sum(1) + 1)
    return float(1 - dice[1:].mean())


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


def frozen_for_cpu(model: nn.Module) -> nn.Module:
    """
    ``model`` (put in eval mode) as a frozen TorchScript module for CPU inference:
    ``torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))`` folds every BatchNorm
    into its convolution and fuses oneDNN operations. The outputs equal the eager ones within float32
    rounding (measured: 3e-7). Faster for narrow networks (la_cpu.yaml's: 2.5x per window on one core),
    slower for la.yaml's full-width ones (1.2x slower), hence a config switch (``jit_optimize``). The first
    calls are slower (TorchScript profiles them): it pays off over many windows (the field protocol: 2.9x a
    volume), not over a few (the fast protocol: no gain). Attributes such as ``DualNet.output`` are frozen
    in: set them before.
    """
    with torch.no_grad():
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model.eval())))


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
