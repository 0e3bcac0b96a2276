"""Loss terms of uncertainty-guided dual-network semi-supervised segmentation.

All losses take logits ``z`` of shape ``[B, C, *spatial]`` (``C >= 2``, softmax over channels),
work for any class count and never leave the device inside ``forward`` (no ``.item()``, no
numpy), so they run unchanged under CUDA graphs, AMP and DDP. Under mixed precision they compute
in float32: autocast is off inside, float16/bfloat16 inputs are upcast and the result is float32
(sums over millions of voxels overflow float16's maximum of 65504).

- :class:`SupervisedLoss`: CE + Dice (MONAI's :class:`~monai.losses.DiceCELoss`) plus the
  mutual-correction term :class:`MutualCorrectionLoss` (MCF).
- :class:`CrossConsistencyLoss`: cross pseudo supervision in both directions with entropy
  filtering and KL-based dynamic weighting ("cross consistency enhancement");
  :class:`EntropyFilteredCPSLoss` is the same without the KL weighting.
- :class:`PrototypeContrastiveLoss`: InfoNCE of sampled uncertain voxels against detached class
  prototypes of reliable voxels.
- :class:`CosineConsistencyLoss`: ``mean(1 - cos(p_A, p_B))``.
- :func:`sigmoid_rampup`: the weight schedule ``exp(-5 (1 - min(t / T, 1))^2)``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = [
    "sigmoid_rampup",
    "MutualCorrectionLoss",
    "SupervisedLoss",
    "CrossConsistencyLoss",
    "EntropyFilteredCPSLoss",
    "PrototypeContrastiveLoss",
    "CosineConsistencyLoss",
]


def sigmoid_rampup(step: float, rampup_length: float, max_value: float = 1.0) -> float:
    """``max_value * exp(-5 (1 - min(step / rampup_length, 1))^2)``; ``max_value`` when the length is 0."""
    if rampup_length <= 0:
        return float(max_value)
    phase = 1.0 - min(max(float(step), 0.0) / rampup_length, 1.0)
    return float(max_value * math.exp(-5.0 * phase * phase))


def _float32(method):
    """Run ``method`` with autocast off and its float16/bfloat16 tensor arguments upcast to float32."""

    def upcast(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        args = [upcast(a) for a in args]
        kwargs = {k: upcast(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return method(self, *args, **kwargs)

    return wrapper


def _check_logits(name: str, input: torch.Tensor) -> None:
    if input.dim() < 3 or input.shape[1] < 2:
        raise ValueError(
            f"{name}: expected logits of shape [B, C, *spatial] with C >= 2, found shape {tuple(input.shape)}."
        )


def _check_same(name: str, what: str, expected: torch.Tensor, found: torch.Tensor) -> None:
    if expected.shape != found.shape:
        raise ValueError(
            f"{name}: expected {what} of shape {tuple(expected.shape)} (same as input), found {tuple(found.shape)}."
        )


def _check_target(name: str, input: torch.Tensor, target: torch.Tensor) -> None:
    expected = (input.shape[0], 1, *input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{name}: expected target of shape {expected} (class indices, channel first), "
            f"found {tuple(target.shape)}."
        )


def _reduce(values: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean over ``count`` items (at least one), sum, or the values themselves."""
    if reduction == LossReduction.MEAN.value:
        return values.sum() / count.clamp_min(1)
    if reduction == LossReduction.SUM.value:
        return values.sum()
    return values


def _max(x: torch.Tensor, dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel maximum and its first index, ``[B, C, *] -> ([B, *], [B, *] of dtype)``, as ``x.max(dim=1)``.

    The index counts the leading channels below the maximum, ``sum_c prod_{c' <= c} 1[x_c' < max]``:
    ``C - 1`` elementwise passes after ``amax``, several times faster on CPU than ``max(dim=1)`` or
    ``argmax(dim=1)``, whose reductions over the channel stride are slow. A narrow ``dtype`` (int8 for
    fewer than 128 classes) makes the passes over an index that is only compared cheaper. Unlike ``max``, a
    NaN is not taken as the maximum's index (the value is NaN; callers stop on non-finite losses anyway).
    """
    values = x.amax(dim=1)
    index = torch.zeros_like(values, dtype=dtype)
    below = torch.ones_like(values, dtype=torch.bool)
    for c in range(x.shape[1] - 1):
        below &= x[:, c] < values
        index += below
    return values, index


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Channel argmax ``[B, C, *] -> [B, *]`` (the first index of the maximum, see :func:`_max`)."""
    return _max(x)[1]


def _norm(x: torch.Tensor) -> torch.Tensor:
    """``max(||x||_2, 1e-12)`` along dim 1, kept (``linalg.vector_norm`` over a strided dim 1 is 15x slower on CPU)."""
    return x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``x / max(||x||_2, 1e-12)`` along dim 1 (as ``F.normalize``, several times faster on CPU)."""
    return x / _norm(x)


def lowest_fraction(values: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ``ceil(ratio * N)`` lowest ``values`` over the whole tensor (ties kept).

    The threshold is the k-th smallest value (``torch.kthvalue``), computed on the device.
    """
    flat = values.detach().flatten()
    k = max(1, min(flat.numel(), math.ceil(ratio * flat.numel())))
    return values <= flat.float().kthvalue(k).values.to(values.dtype)


def lowest_fraction_per_class(
    values: torch.Tensor, classes: torch.Tensor, num_classes: int, ratio: float
) -> torch.Tensor:
    """Boolean mask of the ``ceil(ratio * N_c)`` lowest ``values`` among the ``N_c`` voxels of each class ``c``.

    ``classes`` holds a class index in ``[0, num_classes)`` per element of ``values`` (same number of
    elements); the mask has ``values``' shape. As in :func:`lowest_fraction`, the threshold of class ``c`` is its
    ``ceil(ratio * N_c)``-th smallest value and ties with it are kept.
    """
    flat, cls = values.detach().flatten().float(), classes.flatten().long()
    counts = torch.zeros(num_classes, dtype=torch.long, device=cls.device).scatter_add_(0, cls, torch.ones_like(cls))
    k = torch.minimum((counts.double() * ratio).ceil().long(), counts)  # in float64, as math.ceil(ratio * N)
    return (flat <= _kth_per_class(flat, cls, counts, k, sort=flat.device.type != "cpu")[cls]).view(values.shape)


def _kth_per_class(
    flat: torch.Tensor, cls: torch.Tensor, counts: torch.Tensor, k: torch.Tensor, sort: bool
) -> torch.Tensor:
    """``[C]``: the ``k[c]``-th smallest of ``flat`` among the voxels of class ``c`` (any value for an absent class).

    ``sort=False``: ``kthvalue`` per class present (``C`` passes, ``k`` read on the host: the CPU's way, 2.5x
    faster there than sorting at 0.3 M voxels and 4 classes, 5x at 2 M and 2). ``sort=True``: one sort by value,
    then a stable sort by class, on the device without a host round-trip or a data-dependent shape (for CUDA and
    CUDA graphs).
    """
    if not sort:
        inf = flat.new_tensor(float("inf"))
        return torch.stack([flat.masked_fill(cls != c, inf).kthvalue(kc).values if kc else inf
                            for c, kc in enumerate(k.tolist())])
    order = flat.argsort()
    order = order[cls[order].argsort(stable=True)]  # grouped by class, ascending values within each
    start = counts.cumsum(0) - counts
    return flat[order][(start + k - 1).clamp(0, flat.numel() - 1)]


def _lowest(values: torch.Tensor, ratio: float, scope: str, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """:func:`lowest_fraction` over the batch (``scope="batch"``) or per class (``"class"``)."""
    if scope == "batch":
        return lowest_fraction(values, ratio)
    return lowest_fraction_per_class(values, classes, num_classes, ratio)


def _check_scope(scope: str) -> None:
    if scope not in ("batch", "class"):
        raise ValueError(f"filter_scope must be 'batch' or 'class', found {scope!r}.")


class MutualCorrectionLoss(_Loss):
    """Mutual correction (MCF): squared error to the label where the two networks disagree confidently.

    For network ``k`` with probabilities ``p = softmax(input)`` and the other network's ``q``
    (detached), a voxel ``v`` is *confident for class c* in a network when its argmax is ``c``
    and its maximum probability is at least ``threshold``. The mask is

    ``m_v = OR_{c >= 1} XOR(conf_c(p)_v, conf_c(q)_v)``

    (for two classes: exactly one network confidently predicts foreground), and

    ``L = sum_v m_v * mean_c (p_cv - y_cv)^2 / max(sum_v m_v, 1)``

    with ``y`` the one-hot label. An empty mask gives 0. Computes in float32 (also under autocast or on
    float16/bfloat16 logits) and returns float32.

    Args:
        threshold: confidence threshold on the maximum probability. Defaults to 0.6.
        reduction: ``"mean"`` (over masked voxels), ``"sum"`` or ``"none"`` (the masked
            per-voxel map ``[B, 1, *spatial]``).

    Raises:
        ValueError: when ``threshold`` is outside [0, 1] or the shapes of ``input``, ``other``
            (``[B, C, *spatial]``) and ``target`` (``[B, 1, *spatial]``) do not match.
    """

    def __init__(self, threshold: float = 0.6, reduction: str = "mean") -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], found {threshold}.")
        self.threshold = threshold

    @_float32
    def mask(self, input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Confident-disagreement mask ``[B, 1, *spatial]`` (bool) of two logit maps."""

        def confident_class(logits: torch.Tensor) -> torch.Tensor:  # [B, *spatial]: argmax, -1 if not confident
            probs = F.softmax(logits.detach().float(), dim=1)
            conf, label = _max(probs, torch.int8 if probs.shape[1] < 128 else torch.long)
            return label.masked_fill_(conf < self.threshold, -1)

        # some foreground conf_c differs <=> the confident classes differ and one of them is foreground
        a, b = confident_class(input), confident_class(other)
        return ((a != b) & (torch.maximum(a, b) >= 1)).unsqueeze(1)

    @_float32
    def forward(self, input: torch.Tensor, other: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits of the network being trained, ``[B, C, *spatial]``.
            other: logits of the other network, same shape (no gradient flows into it).
            target: class indices ``[B, 1, *spatial]``.
        """
        _check_logits("MutualCorrectionLoss", input)
        _check_same("MutualCorrectionLoss", "other", input, other)
        _check_target("MutualCorrectionLoss", input, target)
        mask = self.mask(input, other)
        p = F.softmax(input, dim=1)
        # mean_c (p_c - y_c)^2 = (sum_c p_c^2 - 2 p_y + 1) / C, without the one-hot label
        sq = (p.pow(2).sum(dim=1, keepdim=True) - 2 * p.gather(1, target.long()) + 1) / input.shape[1]
        return _reduce(sq * mask, mask.sum(), self.reduction)


class SupervisedLoss(_Loss):
    """Supervised loss of one network: ``CE(z, y) + Dice(softmax(z), y) + alpha * L_corr(z, z_other, y)``.

    CE and Dice are MONAI's :class:`~monai.losses.DiceCELoss` (``to_onehot_y=True, softmax=True``);
    ``L_corr`` is :class:`MutualCorrectionLoss`, skipped when ``other`` is None or ``alpha == 0``.
    Computes in float32 (also under autocast or on float16/bfloat16 logits; MONAI's Dice sums in
    the input's dtype) and returns float32.

    Args:
        alpha: weight of the mutual-correction term. Defaults to 0.5.
        threshold: confidence threshold of the mutual-correction mask. Defaults to 0.6.
        include_background: include class 0 in the Dice term (the field uses foreground Dice,
            so False by default; CE always uses every class).
        reduction: ``"mean"`` or ``"sum"`` (as in DiceCELoss).

    Raises:
        ValueError: on negative ``alpha`` or mismatched shapes (input ``[B, C, *spatial]``,
            target ``[B, 1, *spatial]``).
    """

    def __init__(
        self, alpha: float = 0.5, threshold: float = 0.6, include_background: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, found {alpha}.")
        self.alpha = alpha
        self.dice_ce = DiceCELoss(
            include_background=include_background, to_onehot_y=True, softmax=True, reduction=self.reduction
        )
        self.correction = MutualCorrectionLoss(threshold=threshold, reduction=self.reduction)

    @_float32
    def terms(
        self, input: torch.Tensor, target: torch.Tensor, other: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The terms ``{"ce", "dice", "corr"}`` (``corr`` is 0 without ``other``)."""
        _check_logits("SupervisedLoss", input)
        _check_target("SupervisedLoss", input, target)
        corr = input.new_zeros(())
        if other is not None and self.alpha > 0:
            corr = self.correction(input, other, target)
        return {"ce": self.dice_ce.ce(input, target), "dice": self.dice_ce.dice(input, target), "corr": corr}

    @_float32
    def forward(self, input: torch.Tensor, target: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: logits ``[B, C, *spatial]`` of the network being trained.
            target: class indices ``[B, 1, *spatial]``.
            other: optional logits of the paired network (detached inside), same shape as input.
        """
        t = self.terms(input, target, other)
        return t["ce"] + t["dice"] + self.alpha * t["corr"]


class CrossConsistencyLoss(_Loss):
    """Cross pseudo supervision with entropy filtering and KL-based dynamic weighting, both directions.

    One direction, student logits ``z_s``, teacher logits ``z_t`` (detached):

    - pseudo-label ``y_hat = argmax softmax(z_t)``;
    - filter: entropy ``H = -sum_c p_c log p_c`` of ``p = softmax(z_t)``; the kept set ``K`` is
      the ``ceil(keep_ratio * N)`` lowest-entropy voxels of the batch (``filter_rule="certain"``,
      U2PL's convention) or the highest (``"uncertain"``, the rule of the authors' released code);
      with ``filter_scope="class"`` the ``ceil(keep_ratio * N_c)`` lowest (highest) of each pseudo-class
      ``c`` instead, so that small or less confident structures keep pseudo-labels too;
    - weight (Zheng & Yang 2021): ``D = KL(softmax(z_t / T) || softmax(z_s / T))`` per voxel,
      ``w = exp(-D)``;
    - per-voxel loss ``l_v = (N / |K|) 1[v in K] w_v CE(z_s, y_hat)_v + D_v`` (the rectification
      term ``D_v`` can be switched off with ``kl_rectify=False``).

    ``"mean"`` gives ``mean_v l_v = mean_{v in K}(w CE) + mean_v D``; the ``N / |K|`` factor keeps
    the scale independent of the kept fraction. ``forward(z_a, z_b)`` returns the sum of both
    directions (A as student of B plus B as student of A), so each network gets gradient only
    through its student side. With ``kl_weighting=False``, ``w = 1`` and the ``D`` term is dropped
    (plain entropy-filtered CPS); with ``entropy_filter=False`` every voxel is kept. Computes in
    float32 (also under autocast or on float16/bfloat16 logits) and returns float32. After each call,
    ``stats`` holds detached diagnostics of the weighting over the kept voxels of both directions:
    ``kl_w_mean`` and ``kl_w_std`` (of ``w``) and ``kl_mean`` (of ``D``); empty without KL weighting.

    Args:
        keep_ratio: fraction of voxels kept by the entropy filter, in (0, 1]. Defaults to 0.8.
        filter_rule: ``"certain"`` keeps the lowest-entropy voxels, ``"uncertain"`` the highest.
        entropy_filter: apply the entropy filter. Defaults to True.
        filter_scope: rank the entropies over the whole batch (``"batch"``, the paper's) or within each
            pseudo-class (``"class"``). Defaults to ``"batch"``.
        kl_weighting: apply the KL-based weighting and its ``mean(D)`` term. Defaults to True.
        temperature: softmax temperature ``T > 0`` of the KL term. Defaults to 1.0.
        detach_weight: stop the gradient through ``w`` (Zheng & Yang do not). Defaults to False.
        kl_rectify: add the rectification term ``mean(D)`` (Zheng & Yang). Defaults to True.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-voxel ``[B, 1, *spatial]`` map,
            summed over both directions).

    Raises:
        ValueError: on an out-of-range argument or mismatched logits shapes.
    """

    def __init__(
        self,
        keep_ratio: float = 0.8,
        filter_rule: str = "certain",
        entropy_filter: bool = True,
        kl_weighting: bool = True,
        temperature: float = 1.0,
        detach_weight: bool = False,
        reduction: str = "mean",
        kl_rectify: bool = True,
        filter_scope: str = "batch",
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], found {keep_ratio}.")
        _check_scope(filter_scope)
        if filter_rule not in ("certain", "uncertain"):
            raise ValueError(f"filter_rule must be 'certain' or 'uncertain', found {filter_rule!r}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, found {temperature}.")
        self.keep_ratio = keep_ratio
        self.filter_rule = filter_rule
        self.entropy_filter = entropy_filter
        self.kl_weighting = kl_weighting
        self.temperature = temperature
        self.detach_weight = detach_weight
        self.kl_rectify = kl_rectify
        self.filter_scope = filter_scope
        self.stats: dict[str, torch.Tensor] = {}
        self._sums: list[torch.Tensor] = []

    @_float32
    def kept(self, teacher: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B, 1, *spatial]`` mask of the voxels whose pseudo-labels are used."""
        log_t = F.log_softmax(teacher.detach().float(), dim=1)
        return self.kept_from_log_probs(log_t, _argmax(log_t))

    def kept_from_log_probs(self, log_t: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """:meth:`kept` from the teacher's log-probabilities and pseudo-labels ``[B, *spatial]``."""
        if not self.entropy_filter or self.keep_ratio >= 1.0:
            return torch.ones_like(log_t[:, :1], dtype=torch.bool)
        h = -(log_t.exp() * log_t).sum(dim=1, keepdim=True)
        h = h if self.filter_rule == "certain" else -h
        return _lowest(h, self.keep_ratio, self.filter_scope, pseudo, log_t.shape[1])

    @_float32
    def one_way(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Per-voxel loss map ``l`` ``[B, 1, *spatial]`` of ``student`` taught by ``teacher``."""
        log_t = F.log_softmax(teacher.detach().float(), dim=1)
        log_s = F.log_softmax(student.float(), dim=1)
        pseudo = _argmax(log_t)
        ce = -log_s.gather(1, pseudo.unsqueeze(1))
        keep = self.kept_from_log_probs(log_t, pseudo)
        loss = ce * keep * (keep.numel() / keep.sum().clamp_min(1))
        if not self.kl_weighting:
            return loss
        if self.temperature != 1.0:
            log_t = F.log_softmax(teacher.detach().float() / self.temperature, dim=1)
            log_s = F.log_softmax(student.float() / self.temperature, dim=1)
        d = (log_t.exp() * (log_t - log_s)).sum(dim=1, keepdim=True)
        w = torch.exp(-d)
        wk, dd = (w * keep).detach(), d.detach()  # masked sums: no host round-trip
        self._sums.append(torch.stack([wk.sum(), (wk * wk).sum(), keep.sum(), dd.sum(), dd.new_tensor(dd.numel())]))
        return (w.detach() if self.detach_weight else w) * loss + (d if self.kl_rectify else 0)

    @_float32
    def forward(self, input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits of network A, ``[B, C, *spatial]`` (unlabeled batch).
            other: logits of network B, same shape.
        """
        _check_logits(type(self).__name__, input)
        _check_same(type(self).__name__, "other", input, other)
        self._sums = []
        loss = self.one_way(input, other) + self.one_way(other, input)
        self.stats = self._weight_stats()
        return _reduce(loss, loss.new_tensor(loss.numel()), self.reduction)

    def _weight_stats(self) -> dict[str, torch.Tensor]:
        """Mean and std of ``w`` over the kept voxels and mean ``D`` over all voxels, of the last call."""
        if not self._sums:
            return {}
        sw, sw2, n, sd, nd = torch.stack(self._sums).sum(0)
        self._sums = []
        mean = sw / n.clamp_min(1)
        return {"kl_w_mean": mean, "kl_w_std": (sw2 / n.clamp_min(1) - mean**2).clamp_min(0).sqrt(), "kl_mean": sd / nd}


class EntropyFilteredCPSLoss(CrossConsistencyLoss):
    """Entropy-filtered cross pseudo supervision: :class:`CrossConsistencyLoss` without KL weighting.

    ``L = mean_{v in K_B} CE(z_A, argmax p_B)_v + mean_{v in K_A} CE(z_B, argmax p_A)_v``
    with ``K_k`` the ``keep_ratio`` lowest-entropy voxels of network k's prediction (of the batch, or of each
    pseudo-class with ``filter_scope="class"``). Arguments as in :class:`CrossConsistencyLoss`.
    """

    def __init__(
        self,
        keep_ratio: float = 0.8,
        filter_rule: str = "certain",
        entropy_filter: bool = True,
        reduction: str = "mean",
        filter_scope: str = "batch",
    ) -> None:
        super().__init__(
            keep_ratio, filter_rule, entropy_filter, kl_weighting=False, reduction=reduction, filter_scope=filter_scope
        )


class PrototypeContrastiveLoss(_Loss):
    """Prototype contrastive loss: uncertain voxels pulled to their class prototype (InfoNCE).

    With ``p`` the mean softmax of the given logits (detached), ``y_hat = argmax p`` and entropy
    ``H(p)``, a voxel is *reliable* when ``H`` is among the ``keep_ratio`` lowest of the batch (with
    ``filter_scope="class"``: of the voxels of its class ``y_hat``) and all given networks agree on
    ``y_hat``; the others are *uncertain*. With L2-normalised features
    ``f`` (``[B, F, *spatial]``), the prototype of class c is the normalised mean of ``f`` over
    reliable voxels of class c (detached). A random ``sample_ratio`` of the uncertain voxels (at
    least ``min_samples``, at most ``max_samples``) gives

    ``L = mean_j -log( exp(f_j . mu_{y_hat_j} / tau) / sum_{c present} exp(f_j . mu_c / tau) )``.

    Samples whose class has no prototype are skipped; no uncertain voxel or no prototype gives 0
    (never NaN). The gradient flows into the sampled features only. Sampling stays on the device:
    ``max_samples`` candidates are drawn by random scores and the first ``k`` valid ones count.
    Computes in float32 (also under autocast or on float16/bfloat16 inputs): the per-class feature
    sums reach about a million at the paper's patch size, beyond float16's 65504; returns float32.

    Args:
        temperature: InfoNCE temperature ``tau``. Defaults to 0.1.
        keep_ratio: fraction of voxels that may count as reliable (lowest entropy). Defaults to 0.8.
        sample_ratio: fraction of uncertain voxels sampled. Defaults to 0.01.
        min_samples: minimum number of sampled voxels (when available). Defaults to 64.
        max_samples: cap on sampled voxels (memory). Defaults to 4096.
        reduction: ``"mean"`` (over valid samples), ``"sum"`` or ``"none"`` (``[max_samples]``
            per-sample losses, zero where invalid).
        filter_scope: rank the entropies over the batch (``"batch"``) or within each pseudo-class
            (``"class"``: every class present gets reliable voxels, hence a prototype). Defaults to ``"batch"``.

    Raises:
        ValueError: on out-of-range arguments, or features / logits whose batch or spatial
            shapes differ.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        keep_ratio: float = 0.8,
        sample_ratio: float = 0.01,
        min_samples: int = 64,
        max_samples: int = 4096,
        reduction: str = "mean",
        filter_scope: str = "batch",
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        _check_scope(filter_scope)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, found {temperature}.")
        if not 0.0 < keep_ratio <= 1.0 or not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"keep_ratio and sample_ratio must be in (0, 1], found {keep_ratio}, {sample_ratio}.")
        if not 1 <= min_samples <= max_samples:
            raise ValueError(f"need 1 <= min_samples <= max_samples, found {min_samples}, {max_samples}.")
        self.temperature = temperature
        self.keep_ratio = keep_ratio
        self.sample_ratio = sample_ratio
        self.min_samples = min_samples
        self.max_samples = max_samples
        self.filter_scope = filter_scope

    def partition(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-labels ``[B, N]`` (long) and reliable mask ``[B, N]`` (bool) from the logits."""
        probs = torch.stack([F.softmax(z.detach().float(), dim=1) for z in logits]).mean(0)
        pseudo = _argmax(probs)
        h = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
        reliable = _lowest(h, self.keep_ratio, self.filter_scope, pseudo, probs.shape[1])
        for z in logits:
            reliable &= _argmax(z) == pseudo
        return pseudo.flatten(1), reliable.flatten(1)

    @_float32
    def forward(
        self, features: torch.Tensor, logits: torch.Tensor, logits_other: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            features: per-voxel features ``[B, F, *spatial]`` (gradient flows here).
            logits: logits ``[B, C, *spatial]`` giving pseudo-labels and entropy (detached).
            logits_other: optional logits of the paired network, same shape as ``logits``; its
                softmax is averaged in and voxels where the two disagree are never reliable.
        """
        name = "PrototypeContrastiveLoss"
        _check_logits(name, logits)
        if logits_other is not None:
            _check_same(name, "logits_other", logits, logits_other)
        if features.dim() != logits.dim() or features.shape[0] != logits.shape[0] or features.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"{name}: expected features of shape [{logits.shape[0]}, F, {', '.join(map(str, logits.shape[2:]))}], "
                f"found {tuple(features.shape)}."
            )
        n_classes = logits.shape[1]
        pseudo, reliable = self.partition([logits] if logits_other is None else [logits, logits_other])
        flat = features.flatten(2)  # [B, F, N]
        hot = F.one_hot(pseudo, n_classes).float() * reliable.unsqueeze(-1)  # [B, N, C]
        present = hot.sum(dim=(0, 1)) > 0  # [C]
        # sum of unit features per class, f / |f| folded into the one-hot weights (no normalised copy of f)
        f = flat.detach().float()
        sums = torch.einsum("bfn,bnc->cf", f, hot / _norm(f).transpose(1, 2))
        protos = _unit(sums)

        uncertain = ~reliable.flatten()
        n_samples = min(self.max_samples, uncertain.numel())
        score = torch.rand(uncertain.shape, device=uncertain.device).masked_fill(~uncertain, -1.0)
        top, idx = score.topk(n_samples)
        want = (uncertain.sum() * self.sample_ratio).ceil().clamp(self.min_samples, self.max_samples)
        cls = pseudo.flatten()[idx]
        valid = (top >= 0) & (torch.arange(n_samples, device=idx.device) < want) & present[cls]

        n_voxels = flat.shape[2]
        sampled = _unit(flat[idx // n_voxels, :, idx % n_voxels].float())  # [S, F]
        sim = (sampled @ protos.t() / self.temperature).masked_fill(~present, -1e4)
        nll = F.cross_entropy(sim, cls, reduction="none") * valid
        return _reduce(nll, valid.sum(), self.reduction)


class CosineConsistencyLoss(_Loss):
    """Cosine consistency of two probability maps: ``mean_v (1 - cos(p_A[:, v], p_B[:, v]))``.

    ``p = softmax(z)`` over channels; both inputs receive gradient. Computes in float32 (also under
    autocast or on float16/bfloat16 logits) and returns float32.

    Args:
        reduction: ``"mean"`` (over voxels), ``"sum"`` or ``"none"`` (``[B, 1, *spatial]``).

    Raises:
        ValueError: when the two logit maps differ in shape.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=LossReduction(reduction).value)

    @_float32
    def forward(self, input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits of network A, ``[B, C, *spatial]``.
            other: logits of network B, same shape.
        """
        _check_logits("CosineConsistencyLoss", input)
        _check_same("CosineConsistencyLoss", "other", input, other)
        p, q = F.softmax(input, dim=1), F.softmax(other, dim=1)
        norms = (p.pow(2).sum(dim=1, keepdim=True) * q.pow(2).sum(dim=1, keepdim=True)).sqrt()
        loss = 1.0 - (p * q).sum(dim=1, keepdim=True) / norms.clamp_min(1e-8)
        return _reduce(loss, loss.new_tensor(loss.numel()), self.reduction)
