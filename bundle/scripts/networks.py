"""Segmentation networks of uncertainty-guided dual-network semi-supervised 3D segmentation.

- :class:`VNet`: the V-Net of UA-MT / MC-Net (about 9.45 M parameters at ``n_filters=16``).
- :class:`ResNetVNet`: a 3D ResNet-34 encoder with the same V-Net decoder (about 17.9 M).
- :class:`DualNet`: the inference ensemble holding both (``net_a``: ResNetVNet, ``net_b``: VNet),
  returning the mean of their softmax maps as a single tensor (or, with ``output="uncertainty"``,
  that mean followed by entropy and disagreement maps from :func:`ensemble_uncertainty`).

All networks down-sample 4 times, by 2 along every axis unless ``strides`` says otherwise (e.g.
``[[2, 2, 1], [2, 2, 1], 2, 2]`` keeps a short, coarse slice axis at full resolution for two levels),
take ``[B, in_channels, H, W, D]`` inputs whose spatial sizes are divisible by the product of the
strides along each axis (16 by default; see :func:`stride_divisors`) and return one tensor
``[B, out_channels, H, W, D]`` from ``forward`` (so MONAI inferers and TorchScript export work);
:meth:`VNet.forward_features` / :meth:`ResNetVNet.forward_features` additionally return the last
decoder feature map (optionally through a projection head) for feature-level losses.

Memory format: every network takes ``memory_format`` (``"contiguous"`` or ``"channels_last"``, see
:data:`MEMORY_FORMATS`); with ``"channels_last"`` its weights and every feature map are
``torch.channels_last_3d`` (channels innermost), the layout oneDNN's CPU convolutions work in, and
the input is converted at the network's entry (free for one-channel images). On CPU this is about
2-3x faster than the default layout; :func:`resolve_memory_format` maps the configs' ``"auto"`` to
it on CPU and to ``"contiguous"`` elsewhere. The 1x1x1 convolutions (classifier, projection head)
are matrix products over the channel axis, so no layer converts back and forth; only the class maps
(logits, a few channels) are copied to the default layout, which softmax, the losses and MONAI's
inferers use.
"""

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "VNet", "ResNetVNet", "DualNet", "ensemble_uncertainty", "MEMORY_FORMATS", "resolve_memory_format",
    "set_num_threads", "stride_divisors",
]

NORM_TYPES = ("batch", "instance", "group", "none")
#: values of the configs' ``memory_format`` (``"auto"``: channels_last on CPU, contiguous elsewhere)
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
_DECODER_BLOCKS = (3, 3, 2, 1)  # conv blocks of UA-MT's block_six .. block_nine
Stride = Tuple[int, int, int]


def _norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer ``norm`` (one of :data:`NORM_TYPES`) for ``channels`` feature maps.

    Group norm uses 8 groups, or the largest divisor of ``channels`` below 8 for small widths.
    """
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    _check_norm(norm)
    return nn.Identity()


def resolve_memory_format(memory_format: str, device) -> str:
    """``"contiguous"`` or ``"channels_last"`` for ``memory_format`` (one of :data:`MEMORY_FORMATS`) on ``device``.

    ``"auto"`` is the faster one measured on the device type: ``"channels_last"`` on CPU (oneDNN's
    3-D convolutions run natively in it, 2-3x faster for these networks), ``"contiguous"`` elsewhere
    (CUDA's default is kept: not measured here).

    Raises:
        ValueError: for a value not in :data:`MEMORY_FORMATS`.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory_format {memory_format!r}; expected one of {', '.join(MEMORY_FORMATS)}.")
    if memory_format == "auto":
        return "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return memory_format


def set_num_threads(num_threads: Optional[int] = None) -> int:
    """Set ``torch.set_num_threads``: ``num_threads``, or (None / 0) ``OMP_NUM_THREADS`` when set, else every core
    this process may use. Returns the number set.

    Raises:
        ValueError: for a negative number.
    """
    if num_threads is not None and int(num_threads) < 0:
        raise ValueError(f"num_threads must be a positive integer or null (all cores), found {num_threads}.")
    if not num_threads:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = int(env) if env.isdigit() and int(env) > 0 else cores
    torch.set_num_threads(int(num_threads))
    return int(num_threads)


def _check_memory_format(name: str, memory_format: str) -> bool:
    """Whether ``memory_format`` (``"contiguous"`` or ``"channels_last"``) is channels_last."""
    if memory_format not in ("contiguous", "channels_last"):
        raise ValueError(
            f"{name}: memory_format must be 'contiguous' or 'channels_last' (resolve 'auto' with "
            f"resolve_memory_format first), found {memory_format!r}."
        )
    return memory_format == "channels_last"


def _check_norm(norm: str) -> str:
    if norm not in NORM_TYPES:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORM_TYPES)}.")
    return norm


def _check_counts(name: str, what: str, counts: Sequence[int], length: int) -> Tuple[int, ...]:
    counts = tuple(int(c) for c in counts)
    if len(counts) != length or min(counts) < 1:
        raise ValueError(f"{name}: {what} must be {length} positive integers, found {counts}.")
    return counts


def _check_strides(name: str, strides: Optional[Sequence]) -> Tuple[Stride, ...]:
    """The 4 down-sampling strides as ``(h, w, d)`` triples of 1 or 2 (an int ``s`` is ``(s, s, s)``);
    None: 2 everywhere."""
    if strides is None:
        strides = (2, 2, 2, 2)
    steps = strides if isinstance(strides, (list, tuple)) else [strides]
    triples = [(s,) * 3 if isinstance(s, int) else tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in steps]
    if len(triples) != 4 or any(len(t) != 3 or not set(t) <= {1, 2} for t in triples):
        raise ValueError(
            f"{name}: strides must be 4 down-sampling steps, each 1 or 2 or an (h, w, d) triple of 1s and 2s, "
            f"found {strides!r}."
        )
    return tuple(triples)  # type: ignore[return-value]


def stride_divisors(strides: Optional[Sequence] = None) -> List[int]:
    """Per spatial axis, the number every input size must be a multiple of: the product of ``strides``
    along it (``[16, 16, 16]`` for the default 2x2x2 steps, ``[16, 16, 4]`` for ``[[2, 2, 1], [2, 2, 1], 2, 2]``).

    Raises:
        ValueError: for strides that are not 4 steps of 1s and 2s.
    """
    return [math.prod(t[axis] for t in _check_strides("stride_divisors", strides)) for axis in range(3)]


def _fmt(dims: List[int]) -> str:
    return "(" + ", ".join([str(d) for d in dims]) + ")"


def _check_input(name: str, x: torch.Tensor, in_channels: int, divisors: List[int]) -> None:
    """Raise ``ValueError`` unless ``x`` is ``[B, in_channels, H, W, D]`` with ``H, W, D`` divisible by ``divisors``."""
    shape: List[int] = [int(s) for s in x.shape]
    if len(shape) != 5 or shape[1] != in_channels:
        raise ValueError(
            name + ": expected input of shape [B, " + str(in_channels) + ", H, W, D], found shape " + _fmt(shape) + "."
        )
    spatial = shape[2:]
    for s, k in zip(spatial, divisors):
        if s % k != 0:
            uniform = divisors[0] == divisors[1] and divisors[1] == divisors[2]
            what = str(k) + " in every dimension" if uniform else _fmt(divisors) + " along its axes (strides' products)"
            pad = str(k) if uniform else str(divisors)
            raise ValueError(
                name + ": spatial size " + _fmt(spatial) + " must be divisible by " + what + "; pad or crop the input "
                "(e.g. with monai.transforms.DivisiblePadd(k=" + pad + "))."
            )


class _PointwiseConv3d(nn.Conv3d):
    """1x1x1 convolution (same parameters as ``nn.Conv3d(cin, cout, 1)``).

    On a channels_last_3d input it is one matrix product over the channel axis (PyTorch's CPU 1x1x1
    convolution takes a slow path and returns a contiguous tensor); its result is channels_last_3d,
    or, with ``contiguous_output``, copied to the default layout (the classifier: its few class maps
    go to softmax, losses and inferers, which work in the default layout; the gradient flowing back
    into the network is channels_last either way). On any other input it is the ordinary convolution.
    """

    def __init__(self, cin: int, cout: int, contiguous_output: bool = False):
        super().__init__(cin, cout, 1)
        self.contiguous_output = contiguous_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            weight = self.weight.reshape(self.out_channels, self.in_channels)
            # [B, H, W, D, C] is contiguous: a matrix product whose gradient comes back channels_last too
            y = nn.functional.linear(x.permute(0, 2, 3, 4, 1), weight, self.bias).permute(0, 4, 1, 2, 3)
            return y.contiguous() if self.contiguous_output else y
        return self._conv_forward(x, self.weight, self.bias)


class _ConvNormAct(nn.Sequential):
    """Conv (or transposed conv) + norm + ReLU; the default 3x3x3 kernel with padding 1 keeps the size."""

    def __init__(self, cin: int, cout: int, norm: str, kernel: int | Stride = 3, stride: int | Stride = 1,
                 padding: int = 1, transposed: bool = False):
        conv_type = nn.ConvTranspose3d if transposed else nn.Conv3d
        super().__init__(
            conv_type(cin, cout, kernel, stride=stride, padding=padding),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        )


class _ConvBlock(nn.Sequential):
    """``n`` stacked 3x3x3 conv + norm + ReLU layers; the first maps ``cin`` to ``cout`` channels."""

    def __init__(self, n: int, cin: int, cout: int, norm: str):
        super().__init__(*[_ConvNormAct(cin if i == 0 else cout, cout, norm) for i in range(n)])


def _down(cin: int, cout: int, norm: str, stride: Stride) -> nn.Module:
    """Conv + norm + ReLU with kernel = stride (2x2x2 halves every axis; 2x2x1 keeps the last)."""
    return _ConvNormAct(cin, cout, norm, kernel=stride, stride=stride, padding=0)


def _up(cin: int, cout: int, norm: str, stride: Stride) -> nn.Module:
    """Transposed conv + norm + ReLU with kernel = stride (undoes :func:`_down` of the same stride)."""
    return _ConvNormAct(cin, cout, norm, kernel=stride, stride=stride, padding=0, transposed=True)


class _UpStage(nn.Module):
    """``block(up(x) + skip)``: one V-Net decoder level with an additive skip connection."""

    def __init__(self, cin: int, cout: int, n_convs: int, norm: str, stride: Stride):
        super().__init__()
        self.up = _up(cin, cout, norm, stride)
        self.block = _ConvBlock(n_convs, cout, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(self.up(x) + skip)


class _VNetDecoder(nn.Module):
    """V-Net decoder over the 5 encoder maps ``[f, 2f, 4f, 8f, 16f]`` channels at ``/1 .. /16`` resolution.

    Dropout3d is applied to the bottleneck (deepest map) and to the output of the last decoder
    block; it is active in training only.

    Args:
        n_filters: channels ``f`` of the full-resolution map.
        norm: normalisation, one of ``"batch"``, ``"instance"``, ``"group"``, ``"none"``.
        dropout: Dropout3d probability (0 disables it).
        blocks: conv blocks of the decoder levels, deepest first.
        strides: the encoder's 4 down-sampling strides, shallowest first (each level up-samples by its own).
    """

    def __init__(
        self, n_filters: int, norm: str, dropout: float, blocks: Sequence[int], strides: Sequence[Stride]
    ):
        super().__init__()
        self.bottleneck_dropout = nn.Dropout3d(dropout)
        self.out_dropout = nn.Dropout3d(dropout)
        self.stages = nn.ModuleList(
            [_UpStage(n_filters * 2 ** (4 - i), n_filters * 2 ** (3 - i), blocks[i], norm, strides[3 - i])
             for i in range(4)]
        )

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        x = self.bottleneck_dropout(feats[4])
        for i, stage in enumerate(self.stages):
            x = stage(x, feats[3 - i])
        return self.out_dropout(x)


class _Encoder(nn.Module):
    """Runs ``self.levels`` (an ``nn.ModuleList`` set by subclasses) in sequence and returns every
    level's output, full resolution first."""

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats: List[torch.Tensor] = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class _VNetEncoder(_Encoder):
    """V-Net encoder: ``stages[i]`` conv blocks at ``f * 2**i`` channels, strided conv down-sampling between."""

    def __init__(self, in_channels: int, n_filters: int, stages: Sequence[int], norm: str, strides: Sequence[Stride]):
        super().__init__()
        levels: List[nn.Module] = [_ConvBlock(stages[0], in_channels, n_filters, norm)]
        for i in range(1, 5):
            cin, cout = n_filters * 2 ** (i - 1), n_filters * 2**i
            levels.append(nn.Sequential(_down(cin, cout, norm, strides[i - 1]), _ConvBlock(stages[i], cout, cout, norm)))
        self.levels = nn.ModuleList(levels)


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3x3 convs with norm; identity or 1x1x1 conv + norm shortcut."""

    def __init__(self, cin: int, cout: int, stride: Stride, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            _norm(norm, cout),
        )
        if max(stride) != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv3d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout)
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class _ResNetEncoder(_Encoder):
    """3D ResNet encoder: 7x7x7 stem (stride 1, no max-pool) and 4 stages of basic blocks, each down-sampling
    by its stride in its first block (``/2 .. /16`` by default)."""

    def __init__(self, in_channels: int, n_filters: int, blocks: Sequence[int], norm: str, strides: Sequence[Stride]):
        super().__init__()
        stem = nn.Conv3d(in_channels, n_filters, 7, padding=3, bias=False)
        levels: List[nn.Module] = [nn.Sequential(stem, _norm(norm, n_filters), nn.ReLU(inplace=True))]
        for i in range(4):
            cin, cout = n_filters * 2**i, n_filters * 2 ** (i + 1)
            stage = [_BasicBlock(cin if j == 0 else cout, cout, strides[i] if j == 0 else (1, 1, 1), norm)
                     for j in range(blocks[i])]
            levels.append(nn.Sequential(*stage))
        self.levels = nn.ModuleList(levels)


class _EncoderDecoderNet(nn.Module):
    """Shared head of :class:`VNet` and :class:`ResNetVNet`: encoder -> V-Net decoder -> 1x1x1 classifier."""

    def __init__(
        self, name: str, encoder: nn.Module, in_channels: int, out_channels: int, n_filters: int,
        norm: str, dropout: float, proj_dim: int, strides: Sequence[Stride], memory_format: str = "contiguous",
    ):
        super().__init__()
        if proj_dim < 0:
            raise ValueError(f"{name}: proj_dim must be >= 0, found {proj_dim}.")
        self.net_name = name
        self.in_channels = int(in_channels)
        self.divisors: List[int] = stride_divisors(strides)
        self.encoder = encoder
        self.decoder = _VNetDecoder(n_filters, norm, dropout, _DECODER_BLOCKS, strides)
        self.out_conv = _PointwiseConv3d(n_filters, out_channels, contiguous_output=True)
        if proj_dim > 0:
            self.proj: nn.Module = nn.Sequential(
                _PointwiseConv3d(n_filters, n_filters), nn.ReLU(inplace=True), _PointwiseConv3d(n_filters, proj_dim)
            )
        else:
            self.proj = nn.Identity()
        self.channels_last: bool = False
        self.set_memory_format(memory_format)

    def set_memory_format(self, memory_format: str) -> "_EncoderDecoderNet":
        """Put the weights (and, from then on, every feature map) in ``memory_format``: ``"contiguous"``
        or ``"channels_last"`` (``torch.channels_last_3d``). Parameters stay the same objects, so
        optimizers built before keep working. Returns the network."""
        self.channels_last = _check_memory_format(self.net_name, memory_format)
        self.to(memory_format=torch.channels_last_3d if self.channels_last else torch.contiguous_format)
        return self

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self.net_name, x, self.in_channels, self.divisors)
        if self.channels_last:  # a no-op for channels_last inputs, a stride change only for one channel
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, out_channels, H, W, D]`` of ``x``: ``[B, in_channels, H, W, D]``."""
        return self.out_conv(self._decode(x))

    @torch.jit.export
    def forward_features(self, x: torch.Tensor, start: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)``: features are the last decoder map ``[B, n_filters, H, W, D]``
        (after its dropout) or, with ``proj_dim > 0``, its projection ``[B, proj_dim, H, W, D]``;
        ``start > 0`` returns the features of samples ``start:`` only (the projection is skipped for
        the others, e.g. the labeled part of a mixed batch)."""
        h = self._decode(x)
        if self.channels_last and start > 0:
            # sliced in the memory order [B, H, W, D, C]: the slice's gradient (zeros for samples < start)
            # is then channels_last too; a plain h[start:] would hand the decoder a default-layout gradient
            return self.out_conv(h), self.proj(h.permute(0, 2, 3, 4, 1)[start:].permute(0, 4, 1, 2, 3))
        return self.out_conv(h), self.proj(h[start:])


class VNet(_EncoderDecoderNet):
    """V-Net of UA-MT / MC-Net with additive skips and Dropout3d on the bottleneck and last decoder block.

    Args:
        in_channels: input channels.
        out_channels: output channels (classes, incl. background).
        n_filters: channels of the first stage; stage ``i`` has ``n_filters * 2**i``.
        stages: conv blocks per encoder stage (5 values); the decoder has 3, 3, 2, 1.
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        dropout: Dropout3d probability (training only).
        proj_dim: if > 0, :meth:`forward_features` returns a ``proj_dim``-channel projection of the
            decoder features (1x1x1 conv, ReLU, 1x1x1 conv) instead of the raw features.
        memory_format: ``"contiguous"`` or ``"channels_last"`` (weights and feature maps in
            ``torch.channels_last_3d``; faster on CPU); see :meth:`set_memory_format`.
        strides: the 4 down-sampling steps, each 1 or 2 or an ``(h, w, d)`` triple of them (None: 2).

    Shapes:
        ``forward``: ``[B, in_channels, H, W, D] -> [B, out_channels, H, W, D]``, with ``H, W, D``
        divisible by :func:`stride_divisors` of ``strides`` (16 each by default).

    Raises:
        ValueError: for an unknown ``norm``, invalid ``stages`` or ``strides``, or (in ``forward``) an
            input of the wrong rank/channels or with a spatial size not divisible by the strides.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        stages: Sequence[int] = (1, 2, 3, 3, 3),
        norm: str = "batch",
        dropout: float = 0.5,
        proj_dim: int = 0,
        memory_format: str = "contiguous",
        strides: Optional[Sequence] = None,
    ):
        norm = _check_norm(norm)
        stages = _check_counts("VNet", "stages", stages, 5)
        steps = _check_strides("VNet", strides)
        encoder = _VNetEncoder(in_channels, n_filters, stages, norm, steps)
        super().__init__(
            "VNet", encoder, in_channels, out_channels, n_filters, norm, dropout, proj_dim, steps, memory_format
        )


class ResNetVNet(_EncoderDecoderNet):
    """3D ResNet-34 encoder with a V-Net decoder (additive skips, decoder conv blocks 3, 3, 2, 1).

    The stem (7x7x7 conv, stride 1, no max-pool) gives ``n_filters`` channels at full resolution;
    the residual stages give ``2f, 4f, 8f, 16f`` channels at ``/2, /4, /8, /16``.

    Args:
        in_channels: input channels.
        out_channels: output channels (classes, incl. background).
        n_filters: stem channels ``f``.
        blocks: basic blocks per residual stage (4 values; ResNet-34: ``(3, 4, 6, 3)``).
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        dropout: Dropout3d probability (training only) on the bottleneck and the last decoder block.
        proj_dim: if > 0, :meth:`forward_features` returns a ``proj_dim``-channel projection of the
            decoder features instead of the raw features.
        memory_format: ``"contiguous"`` or ``"channels_last"``; see :meth:`set_memory_format`.
        strides: the 4 residual stages' down-sampling, each 1 or 2 or an ``(h, w, d)`` triple (None: 2).

    Shapes:
        ``forward``: ``[B, in_channels, H, W, D] -> [B, out_channels, H, W, D]``, with ``H, W, D``
        divisible by :func:`stride_divisors` of ``strides`` (16 each by default).

    Raises:
        ValueError: for an unknown ``norm``, invalid ``blocks`` or ``strides``, or (in ``forward``) an
            input of the wrong rank/channels or with a spatial size not divisible by the strides.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        blocks: Sequence[int] = (3, 4, 6, 3),
        norm: str = "batch",
        dropout: float = 0.5,
        proj_dim: int = 0,
        memory_format: str = "contiguous",
        strides: Optional[Sequence] = None,
    ):
        norm = _check_norm(norm)
        blocks = _check_counts("ResNetVNet", "blocks", blocks, 4)
        steps = _check_strides("ResNetVNet", strides)
        encoder = _ResNetEncoder(in_channels, n_filters, blocks, norm, steps)
        super().__init__(
            "ResNetVNet", encoder, in_channels, out_channels, n_filters, norm, dropout, proj_dim, steps, memory_format
        )


class DualNet(nn.Module):
    """Ensemble of :class:`ResNetVNet` (``net_a``) and :class:`VNet` (``net_b``) for inference and export.

    Args:
        in_channels: input channels.
        out_channels: output channels (classes, incl. background).
        n_filters: base width of ``net_a``.
        resnet_blocks: basic blocks per residual stage of ``net_a``.
        vnet_stages: conv blocks per encoder stage of ``net_b``.
        norm: normalisation of both networks.
        dropout: Dropout3d probability of both networks (training only).
        proj_dim: projection dimension of both networks' :meth:`forward_features`.
        output: ``"prob"``: ``p = (softmax(z_a) + softmax(z_b)) / 2``; ``"logits"``: the log of that
            mean (clamped at 1e-8), so ``argmax`` and softmax-based post-processing agree;
            ``"uncertainty"``: ``out_channels + 2`` channels, ``p`` followed by the ensemble entropy
            ``-sum_c p_c log p_c`` (nats) and the symmetric disagreement of the two networks
            ``(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` (see :func:`ensemble_uncertainty`). The mode is
            read at every call, so it can be switched on a built (or loaded) instance by setting the
            ``output`` attribute; the parameters are the same in every mode.
        n_filters_b: base width of ``net_b`` (``None``: same as ``n_filters``).
        memory_format: ``"contiguous"`` or ``"channels_last"`` for both networks (see
            :func:`resolve_memory_format` for the configs' ``"auto"``); the output is in the same format.
        strides: the 4 down-sampling steps of both networks (see :class:`VNet`; None: 2x2x2 each).

    Shapes:
        ``forward``: ``[B, in_channels, H, W, D] -> [B, out_channels, H, W, D]``
        (``[B, out_channels + 2, H, W, D]`` with ``output="uncertainty"``).

    Raises:
        ValueError: for an unknown ``output`` or ``norm``, or an invalid input in ``forward``.
    """

    OUTPUTS = ("prob", "logits", "uncertainty")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        resnet_blocks: Sequence[int] = (3, 4, 6, 3),
        vnet_stages: Sequence[int] = (1, 2, 3, 3, 3),
        norm: str = "batch",
        dropout: float = 0.5,
        proj_dim: int = 0,
        output: str = "prob",
        n_filters_b: Optional[int] = None,
        memory_format: str = "contiguous",
        strides: Optional[Sequence] = None,
    ):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"DualNet: unknown output {output!r}; expected one of {', '.join(self.OUTPUTS)}.")
        self.output: str = output
        nb = n_filters if n_filters_b is None else n_filters_b
        fmt = memory_format
        self.net_a = ResNetVNet(in_channels, out_channels, n_filters, resnet_blocks, norm, dropout, proj_dim, fmt, strides)
        self.net_b = VNet(in_channels, out_channels, nb, vnet_stages, norm, dropout, proj_dim, fmt, strides)

    def set_memory_format(self, memory_format: str) -> "DualNet":
        """:meth:`ResNetVNet.set_memory_format` of both networks; returns the ensemble."""
        self.net_a.set_memory_format(memory_format)
        self.net_b.set_memory_format(memory_format)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean softmax of both networks, its log (``output="logits"``) or the mean softmax with the
        entropy and disagreement channels appended (``output="uncertainty"``)."""
        if self.output == "uncertainty":
            return ensemble_uncertainty(self.net_a(x), self.net_b(x))
        if self.output != "prob" and self.output != "logits":
            raise ValueError(
                "DualNet: unknown output '" + self.output + "'; expected one of prob, logits, uncertainty."
            )
        p = 0.5 * (torch.softmax(self.net_a(x), dim=1) + torch.softmax(self.net_b(x), dim=1))
        if self.output == "logits":
            return torch.log(torch.clamp(p, min=1e-8))
        return p


def ensemble_uncertainty(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """
    Mean softmax of two networks with two voxel-wise uncertainty maps appended on the channel axis.

    With ``p_a = softmax(z_a)``, ``p_b = softmax(z_b)`` and ``p = (p_a + p_b) / 2`` (over ``C`` classes):

    - entropy ``H = -sum_c p_c log p_c`` in nats, in ``[0, log C]``;
    - disagreement ``D = (KL(p_a || p_b) + KL(p_b || p_a)) / 2 = sum_c (p_a,c - p_b,c)(log p_a,c - log p_b,c) / 2``,
      ``>= 0`` and zero where the networks agree exactly.

    Logarithms come from ``log_softmax`` (no clamping), so both maps are finite for any finite logits.

    Args:
        logits_a: logits of the first network, ``[B, C, *spatial]``.
        logits_b: logits of the second network, same shape.

    Returns:
        ``[B, C + 2, *spatial]``: ``p`` (``C`` channels), ``H`` (1 channel), ``D`` (1 channel).

    Raises:
        ValueError: when the two shapes differ.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            "ensemble_uncertainty: logits_a and logits_b must have the same shape, found "
            + _fmt([int(s) for s in logits_a.shape]) + " and " + _fmt([int(s) for s in logits_b.shape]) + "."
        )
    log_pa = torch.log_softmax(logits_a, dim=1)
    log_pb = torch.log_softmax(logits_b, dim=1)
    pa, pb = torch.exp(log_pa), torch.exp(log_pb)
    p = 0.5 * (pa + pb)
    log_p = torch.logaddexp(log_pa, log_pb) - math.log(2.0)
    entropy = -(p * log_p).sum(dim=1, keepdim=True)
    disagreement = 0.5 * ((pa - pb) * (log_pa - log_pb)).sum(dim=1, keepdim=True)
    return torch.cat([p, entropy, disagreement], dim=1)
