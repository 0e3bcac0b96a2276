"""Every loss term under mixed precision at the paper's patch size (2 x 112x112x80 voxels).

CPU autocast with float16 / bfloat16 emulates the CUDA AMP path (``la.yaml`` on a GPU): the
networks' last convolutions give low-precision logits and features, the losses run inside autocast.
Each term, under autocast and on low-precision inputs without autocast, must give a finite float32
value close to float32 and a finite nonzero gradient close to float32's. Two float32 references:
the same inputs rounded to the low precision (the loss's own error) and the original float32 inputs
(end to end, including the rounding of logits and features). ``python tests/test_amp.py`` prints
the measured relative differences.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from monai_dualssl.losses import CosineConsistencyLoss, CrossConsistencyLoss, PrototypeContrastiveLoss, SupervisedLoss

SIZE = (112, 112, 80)
DTYPES = [torch.float16, torch.bfloat16]
MODES = ["autocast", "direct"]


def smooth(g, channels, cell=8):
    """Smooth random field ``[2, channels, *SIZE]`` of about unit std (trilinear upsampling of noise)."""
    low = torch.randn(2, channels, *(s // cell for s in SIZE), generator=g)
    return F.interpolate(low, size=SIZE, mode="trilinear", align_corners=False) * 1.9


@functools.cache
def data():
    """Logits of two correlated networks (a blob-shaped foreground, logits of a few units),
    16 non-negative smooth feature channels (as after a last decoder ReLU) and the label."""
    g = torch.Generator().manual_seed(0)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in SIZE], indexing="ij")
    blob = 1 - sum((a / r) ** 2 for a, r in zip(axes, (0.55, 0.5, 0.6))) + 0.3 * smooth(g, 1, 16)[:, 0]
    shared = smooth(g, 1)[:, 0]

    def logits():
        s = 4 * blob.clamp(-1, 1) + 1.5 * (0.6 * shared + 0.8 * smooth(g, 1)[:, 0])
        return torch.stack([-s / 2, s / 2], 1)

    z_a, z_b = logits(), logits()
    w = torch.randn(1, 16, 1, 1, 1, generator=g)
    feats = F.relu(smooth(g, 16) + 0.5 + 0.7 * (blob > 0).unsqueeze(1) * w)
    return z_a, z_b, feats, (blob > 0).long().unsqueeze(1)


# name: (loss of (z_a, z_b, features, label), indices of the inputs it trains), configured as in train.yaml
TERMS = {
    "supervised": (lambda z_a, z_b, f, y: SupervisedLoss()(z_a, y, z_b), (0,)),
    "cross_consistency": (lambda z_a, z_b, f, y: CrossConsistencyLoss()(z_a, z_b), (0, 1)),
    "prototype": (lambda z_a, z_b, f, y: PrototypeContrastiveLoss()(f, z_a, z_b), (2,)),
    "cosine": (lambda z_a, z_b, f, y: CosineConsistencyLoss()(z_a, z_b), (0, 1)),
    # --filter_scope class: entropies ranked within each pseudo-class
    "cross_consistency_class": (lambda z_a, z_b, f, y: CrossConsistencyLoss(filter_scope="class")(z_a, z_b), (0, 1)),
    "prototype_class": (lambda z_a, z_b, f, y: PrototypeContrastiveLoss(filter_scope="class")(f, z_a, z_b), (2,)),
}


def evaluate(term, dtype, mode):
    """``(value, value dtype, gradient)`` of a term on float32 leaves holding the inputs rounded to ``dtype``.

    ``mode``: ``"float32"`` passes the leaves as they are, ``"direct"`` casts them to ``dtype``,
    ``"autocast"`` casts them under CPU autocast with ``dtype`` (as a network's last conv under AMP).
    """
    fn, trained = TERMS[term]
    *inputs, label = data()
    leaves = [x.to(dtype).to(torch.float32, copy=True).requires_grad_() for x in inputs]
    # GradScaler's initial scale: float16 gradients of a mean over 4 M voxels underflow without it
    scale = 2.0**16 if mode != "float32" and dtype == torch.float16 else 1.0
    torch.manual_seed(0)  # the prototype term samples voxels
    with torch.autocast("cpu", dtype=dtype if mode == "autocast" else torch.bfloat16, enabled=mode == "autocast"):
        loss = fn(*(x if mode == "float32" else x.to(dtype) for x in leaves), label)
    (loss.float() * scale).backward()
    return loss.detach().double(), loss.dtype, torch.cat([leaves[i].grad.flatten() for i in trained]) / scale


@functools.cache
def reference(term, dtype):
    """float32 value and gradient on the inputs rounded to ``dtype`` (``torch.float32``: the originals)."""
    value, _, grad = evaluate(term, dtype, "float32")
    return value, grad


def rel(a, b):
    return float((a - b).norm() / b.norm())


# Tolerances, 3-12x the largest difference measured over the terms and both modes (printed by
# `python tests/test_amp.py`). Own error: the loss computes in float32, the value matches to float32
# summation order; the gradient is rounded once to float16 (2^-11) / bfloat16 (2^-8).
OWN_VALUE = 1e-5
OWN_GRAD = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
# End to end: rounding the logits moves near-tied pseudo-labels, the entropy threshold and the sampled voxels.
E2E_VALUE = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
E2E_GRAD = {torch.float16: 5e-2, torch.bfloat16: 0.15}


@pytest.fixture(scope="module", autouse=True)
def _free_memory():
    yield
    data.cache_clear()
    reference.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("term", list(TERMS))
def test_term_in_low_precision(term, mode, dtype):
    value, value_dtype, grad = evaluate(term, dtype, mode)
    own_value, own_grad = reference(term, dtype)
    ref_value, ref_grad = reference(term, torch.float32)
    assert torch.isfinite(value) and value_dtype == torch.float32, f"{term}: {value.item()} as {value_dtype}"
    assert torch.isfinite(grad).all() and ref_grad.norm() > 0 and grad.norm() > 0, f"{term}: |grad| {grad.norm()}"
    assert rel(value, own_value) < OWN_VALUE, f"{term}: value {value.item()} vs {own_value.item()}"
    assert rel(grad, own_grad) < OWN_GRAD[dtype]
    assert rel(value, ref_value) < E2E_VALUE[dtype], f"{term}: value {value.item()} vs {ref_value.item()}"
    assert rel(grad, ref_grad) < E2E_GRAD[dtype]


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("relative difference to float32: own = on the same rounded inputs, e2e = on the float32 inputs")
    header = ("value own", "value e2e", "grad own", "grad e2e")
    print(f"{'term':18s} {'dtype':9s} {'mode':9s} " + " ".join(f"{h:>10s}" for h in header))
    for term in TERMS:
        for dtype in DTYPES:
            for mode in MODES:
                value, _, grad = evaluate(term, dtype, mode)
                (own_value, own_grad), (ref_value, ref_grad) = reference(term, dtype), reference(term, torch.float32)
                diffs = (rel(value, own_value), rel(value, ref_value), rel(grad, own_grad), rel(grad, ref_grad))
                print(f"{term:18s} {str(dtype)[6:]:9s} {mode:9s} " + " ".join(f"{d:10.2e}" for d in diffs))
