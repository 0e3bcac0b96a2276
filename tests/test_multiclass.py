"""Four classes (ACDC: background, right ventricle, myocardium, left ventricle) through every place where a
binary assumption could hide, with values worked out by hand: the mutual-correction mask, cross pseudo
supervision and its entropy filter, prototype sampling, the metrics and their mean over structures,
largest-component post-processing per class, the disagreement score, montage colours and class names."""

import math

import matplotlib.axes
import numpy as np
import pytest
import torch

from monai_dualssl import (
    ConfigError,
    CosineConsistencyLoss,
    CrossConsistencyLoss,
    MutualCorrectionLoss,
    PrototypeContrastiveLoss,
    SupervisedLoss,
    class_names,
    disagreement_score,
    keep_largest_component,
    save_montage,
    segmentation_metrics,
    summarize,
)
from monai_dualssl.metrics import CLASS_MEAN, class_mean_rows
from monai_dualssl.visualize import CLASS_COLOURS

ACDC_NAMES = {"right_ventricle": 1, "myocardium": 2, "left_ventricle": 3}


def logits_of(probs) -> torch.Tensor:
    """Logits ``[1, C, N]`` whose softmax is ``probs`` (rows: voxels, columns: classes)."""
    return torch.tensor(probs, dtype=torch.float64).log().t()[None].float()


# ---------------------------------------------------------------------------------------------- losses

# (A's probabilities, B's probabilities, label): the confident class is the argmax when its probability >= 0.6
CORRECTION_CASES = [
    ([0.1, 0.1, 0.7, 0.1], [0.1, 0.05, 0.8, 0.05], 2),    # both confident, same foreground class: agree
    ([0.1, 0.1, 0.7, 0.1], [0.05, 0.02, 0.03, 0.9], 3),   # confident, different foreground classes (2 vs 3)
    ([0.1, 0.1, 0.15, 0.65], [0.2, 0.2, 0.2, 0.4], 3),    # A confident 3, B not confident
    ([0.9, 0.05, 0.03, 0.02], [0.1, 0.7, 0.1, 0.1], 1),   # A confident background, B confident 1
    ([0.9, 0.05, 0.03, 0.02], [0.3, 0.5, 0.1, 0.1], 0),   # A confident background, B not confident
    ([0.2, 0.1, 0.5, 0.2], [0.2, 0.1, 0.25, 0.45], 2),    # neither confident
    ([0.95, 0.02, 0.02, 0.01], [0.8, 0.1, 0.05, 0.05], 0),  # both confident background
]


def test_mutual_correction_mask_with_four_classes():
    """The mask is the disagreement of confident argmaxes where one of them is foreground: OR over the
    foreground classes c of XOR(A confident for c, B confident for c)."""
    a = logits_of([p for p, _, _ in CORRECTION_CASES])
    b = logits_of([q for _, q, _ in CORRECTION_CASES])
    loss = MutualCorrectionLoss(threshold=0.6)
    expected = [False, True, True, True, False, False, False]
    assert loss.mask(a, b)[0, 0].tolist() == expected and loss.mask(b, a)[0, 0].tolist() == expected
    # the definition, class by class
    def confident(p, c):
        return int(np.argmax(p)) == c and max(p) >= 0.6
    by_definition = [any(confident(p, c) != confident(q, c) for c in (1, 2, 3)) for p, q, _ in CORRECTION_CASES]
    assert by_definition == expected


def test_mutual_correction_value_with_four_classes():
    a = logits_of([p for p, _, _ in CORRECTION_CASES]).requires_grad_()
    b = logits_of([q for _, q, _ in CORRECTION_CASES])
    target = torch.tensor([[[y for _, _, y in CORRECTION_CASES]]])
    # masked voxels 1, 2, 3: mean over the 4 classes of (p_c - onehot_c)^2
    v1 = (0.1**2 + 0.1**2 + 0.7**2 + 0.9**2) / 4          # label 3
    v2 = (0.1**2 + 0.1**2 + 0.15**2 + 0.35**2) / 4        # label 3
    v3 = (0.9**2 + 0.95**2 + 0.03**2 + 0.02**2) / 4       # label 1
    value = MutualCorrectionLoss(threshold=0.6)(a, b, target)
    assert value.item() == pytest.approx((v1 + v2 + v3) / 3, rel=1e-5)
    value.backward()
    assert a.grad[0, :, [0, 4, 5, 6]].abs().max() == 0 and a.grad[0, :, [1, 2, 3]].abs().min() > 0


def test_cross_pseudo_supervision_with_four_classes():
    """Pseudo-labels are the teacher's argmax over the four classes, entropies sum over the four."""
    p_a = [[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]]   # argmax 2, 0; entropies 1.0889, 0.9404
    p_b = [[0.1, 0.1, 0.2, 0.6], [0.4, 0.3, 0.2, 0.1]]   # argmax 3, 0; entropies 1.0889, 1.2799
    a, b = logits_of(p_a), logits_of(p_b)
    plain = CrossConsistencyLoss(entropy_filter=False, kl_weighting=False)
    # A learns B's labels (3, 0), B learns A's (2, 0); mean over the 2 voxels
    expected = (-math.log(0.1) - math.log(0.7) - math.log(0.2) - math.log(0.4)) / 2
    assert plain(a, b).item() == pytest.approx(expected, rel=1e-5)
    # keep the lower-entropy half of each teacher's voxels: B keeps voxel 0 for A, A keeps voxel 1 for B;
    # each kept voxel's CE is rescaled by N / |K| = 2
    filtered = CrossConsistencyLoss(keep_ratio=0.5, kl_weighting=False)
    assert filtered.kept(b)[0, 0].tolist() == [True, False] and filtered.kept(a)[0, 0].tolist() == [False, True]
    assert filtered(a, b).item() == pytest.approx((2 * -math.log(0.1) + 2 * -math.log(0.4)) / 2, rel=1e-5)


def test_prototype_loss_with_four_classes_and_a_class_without_prototype():
    """Prototypes of classes 0, 1, 2 from the confident voxels; class 3 has none, so the uncertain voxel
    labelled 3 is skipped and the absent class leaves the InfoNCE denominator."""
    confident = lambda c: [0.97 if k == c else 0.01 for k in range(4)]  # noqa: E731
    probs = [confident(0), confident(1), confident(2), confident(1),
             [0.2, 0.2, 0.35, 0.25],    # uncertain, pseudo-class 2
             [0.2, 0.2, 0.25, 0.35]]    # uncertain, pseudo-class 3 (no reliable voxel of class 3)
    logits = logits_of(probs)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.6, 0.8]]).t()[None]
    features.requires_grad_()
    loss = PrototypeContrastiveLoss(temperature=1.0, keep_ratio=4 / 6, sample_ratio=1.0, min_samples=1)
    pseudo, reliable = loss.partition([logits])
    assert pseudo[0].tolist() == [0, 1, 2, 1, 2, 3] and reliable[0].tolist() == [True] * 4 + [False] * 2
    value = loss(features, logits)
    # voxel 4: f = (1, 1)/sqrt(2); prototypes (1, 0), (0, 1), (-1, 0); target class 2
    s = 1 / math.sqrt(2)
    assert value.item() == pytest.approx(-math.log(math.exp(-s) / (2 * math.exp(s) + math.exp(-s))), rel=1e-5)
    value.backward()
    grad = features.grad[0].abs().sum(0)
    assert grad[4] > 0 and grad[[0, 1, 2, 3, 5]].sum() == 0  # only the sampled voxel's feature learns
    # with a reliable voxel of class 3, the second uncertain voxel counts too
    probs[3] = confident(3)
    value = PrototypeContrastiveLoss(temperature=1.0, keep_ratio=4 / 6, sample_ratio=1.0, min_samples=1,
                                     reduction="none")(features.detach(), logits_of(probs))
    assert (value > 0).sum() == 2


def test_class_scope_keeps_pseudo_labels_and_prototypes_of_every_structure():
    """ACDC-like proportions: 120 confident background voxels and 10 less confident ones of each structure. The
    batch's 80 % lowest entropies (120 voxels) are all background: no structure keeps a pseudo-label or gets a
    prototype. Ranked within each pseudo-class, each keeps ceil(0.8 * n): 96 background, 8 per structure."""
    background = [[0.95 - 0.001 * i] + [(0.05 + 0.001 * i) / 3] * 3 for i in range(120)]
    structures = [[0.1 + 0.01 * i if k == 0 else (0.6 - 0.01 * i if k == c else 0.15) for k in range(4)]
                  for c in (1, 2, 3) for i in range(10)]
    z = logits_of(background + structures)
    labels = torch.tensor([0] * 120 + [1] * 10 + [2] * 10 + [3] * 10)
    kept_per_class = {}
    for scope in ("batch", "class"):
        kept = CrossConsistencyLoss(filter_scope=scope).kept(z)[0, 0]
        kept_per_class[scope] = torch.bincount(labels[kept], minlength=4).tolist()
        _, reliable = PrototypeContrastiveLoss(filter_scope=scope).partition([z, z])
        assert torch.equal(reliable[0], kept)  # one network's entropy, agreed pseudo-labels: the same voxels
    assert kept_per_class == {"batch": [120, 0, 0, 0], "class": [96, 8, 8, 8]}
    kept = CrossConsistencyLoss(filter_scope="class").kept(z)[0, 0]
    assert kept[120:130].tolist() == [True] * 8 + [False] * 2  # the most confident of the structure's voxels


def test_every_term_learns_from_four_classes():
    """Finite loss and gradient of every term with 4 classes on random logits."""
    torch.manual_seed(0)
    z_a = torch.randn(2, 4, 8, 8, 4, requires_grad=True)
    z_b = torch.randn(2, 4, 8, 8, 4, requires_grad=True)
    y = torch.randint(0, 4, (2, 1, 8, 8, 4))
    f = torch.randn(2, 6, 8, 8, 4, requires_grad=True)
    terms = [SupervisedLoss()(z_a, y, z_b), CrossConsistencyLoss()(z_a, z_b),
             PrototypeContrastiveLoss(min_samples=8)(f, z_a, z_b), CosineConsistencyLoss()(z_a, z_b)]
    for term, inputs in zip(terms, ([z_a], [z_a, z_b], [f], [z_a, z_b])):
        grads = torch.autograd.grad(term, inputs, retain_graph=True)
        assert torch.isfinite(term) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------- metrics


def four_class_gt() -> np.ndarray:
    gt = np.zeros((6, 6, 4), np.int64)
    gt[0:2, 0:2, 0:2] = 1
    gt[3:5, 0:2, 0:2] = 2
    gt[0:2, 3:5, 0:2] = 3
    return gt


def test_metrics_per_structure_and_their_mean():
    """Case 1: class 1 exact, class 2 shifted one voxel along x (half overlap), class 3 missed; case 2 exact."""
    gt = four_class_gt()
    pred = gt.copy()
    pred[pred == 3] = 0
    pred[pred == 2] = 0
    pred[4:6, 0:2, 0:2] = 2
    spacing = (1.5, 1.5, 10.0)
    c1, c2, c3 = segmentation_metrics(pred, gt, 4, spacing)
    assert c1["dice"] == 1 and c1["hd95_mm"] == 0
    # class 2: 4 of 8 voxels shared; every voxel of a 2x2x2 cube is a surface voxel: half the distances 0, half 1
    assert c2["dice"] == pytest.approx(0.5) and c2["jaccard"] == pytest.approx(1 / 3)
    assert (c2["hd95_vox"], c2["asd_vox"], c2["hd95_mm"], c2["asd_mm"], c2["assd_mm"]) == pytest.approx((1, 0.5, 1.5, 0.75, 0.75))
    assert c3["dice"] == 0 and c3["empty_pred"] and math.isnan(c3["hd95_mm"])
    rows = [{"case": case, "model": "ensemble", "postprocessing": "none", **m}
            for case, p in (("one", pred), ("two", gt)) for m in segmentation_metrics(p, gt, 4, spacing)]
    means = class_mean_rows(rows)
    assert [(r["case"], r["class"]) for r in means] == [("one", CLASS_MEAN), ("two", CLASS_MEAN)]
    assert means[0]["dice"] == pytest.approx(0.5) and means[0]["jaccard"] == pytest.approx(4 / 9)
    assert math.isnan(means[0]["hd95_mm"]) and means[0]["empty_pred"] and not means[0]["empty_gt"]
    assert means[1]["dice"] == 1 and means[1]["hd95_mm"] == 0 and not means[1]["empty_pred"]
    summary = summarize(rows)["ensemble"]["none"]
    assert list(summary) == ["1", "2", "3", CLASS_MEAN]
    mean = summary[CLASS_MEAN]
    assert mean["n_cases"] == 2 and mean["n_empty_pred"] == 1 and mean["n_empty_gt"] == 0
    assert mean["dice"] == {"mean": pytest.approx(0.75), "std": pytest.approx(0.25), "n": 2}
    assert mean["hd95_mm"] == {"mean": 0.0, "std": 0.0, "n": 1}  # case one has no class-3 distance
    assert summary["3"]["dice"]["mean"] == pytest.approx(0.5) and summary["3"]["hd95_mm"]["n"] == 1
    assert summary["2"]["asd_mm"]["mean"] == pytest.approx(0.75 / 2)
    # one foreground class: no mean
    binary = [{**r, "class": 1} for r in rows if r["class"] == 1]
    assert class_mean_rows(binary) == [] and list(summarize(binary)["ensemble"]["none"]) == ["1"]


def test_largest_component_is_taken_per_class():
    """Per class, touching voxels of other classes do not connect; a structure apart from the others is kept
    (a binary 'largest foreground component' would delete it)."""
    labels = np.zeros((10, 10, 3), np.int64)
    labels[0:3, 0:3, :] = 2          # myocardium, 27 voxels
    labels[3, 0, 0] = 2              # touches the block: kept
    labels[5, 5, 1] = 2              # stray voxel: removed
    labels[3:5, 1:3, :] = 3          # left ventricle touching the myocardium, 12 voxels
    labels[6, 1, 1] = 3              # stray: removed (not connected through class 2)
    labels[8:10, 8:10, 0:2] = 1      # right ventricle, apart from the rest: kept
    out = keep_largest_component(labels, num_classes=4)
    assert (out == 2).sum() == 28 and out[5, 5, 1] == 0
    assert (out == 3).sum() == 12 and out[6, 1, 1] == 0
    assert (out == 1).sum() == 8


# ---------------------------------------------------------------------------------------------- uncertainty


def test_disagreement_score_over_every_foreground_class():
    """The region is the union of the predicted structures 1, 2 and 3 (argmax > 0)."""
    n = 9
    classes = [0, 1, 0, 0, 2, 0, 0, 3, 0]
    p = torch.full((1, 4, n, 1, 1), 0.1)
    for v, c in enumerate(classes):
        p[0, c, v] = 0.7
    d = torch.arange(n, dtype=torch.float32).pow(2).view(1, 1, n, 1, 1)
    u = torch.cat([p, torch.zeros_like(d), d], dim=1)  # 4 class probabilities, entropy, disagreement
    assert disagreement_score(u, margin=0) == pytest.approx((1 + 16 + 49) / 3)
    assert disagreement_score(u, margin=1) == pytest.approx(sum(v * v for v in (0, 1, 2, 3, 4, 5, 6, 7, 8)) / 9)


# ---------------------------------------------------------------------------------------------- pictures and names


@pytest.fixture
def drawn(monkeypatch):
    """The fills (imshow of masked arrays) and contour colours drawn while the test runs."""
    found = {"fills": [], "contours": []}
    imshow, contour = matplotlib.axes.Axes.imshow, matplotlib.axes.Axes.contour

    def record_imshow(ax, data, *args, **kwargs):
        if np.ma.isMaskedArray(data):
            found["fills"].append((np.ma.filled(data, -1), kwargs.get("vmax")))
        return imshow(ax, data, *args, **kwargs)

    def record_contour(ax, *args, **kwargs):
        found["contours"].append(tuple(kwargs["colors"]))
        return contour(ax, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", record_imshow)
    monkeypatch.setattr(matplotlib.axes.Axes, "contour", record_contour)
    return found


def test_montage_with_four_classes(tmp_path, drawn):
    gt = np.zeros((12, 12, 3), np.uint8)
    gt[1:4, 1:4, 1], gt[5:8, 5:8, 1], gt[8:11, 1:4, 1] = 1, 2, 3
    save_montage(np.random.default_rng(0).random(gt.shape), gt, tmp_path / "m.png", label=gt, num_slices=1,
                 label_names=ACDC_NAMES)
    # the truth of each structure in its own colour, the fill colour of its prediction
    assert drawn["contours"] == [(CLASS_COLOURS[0],), (CLASS_COLOURS[1],), (CLASS_COLOURS[2],)]
    fill, vmax = drawn["fills"][0]
    assert vmax == len(CLASS_COLOURS) - 1 and sorted(np.unique(fill).tolist()) == [-1, 0, 1, 2]
    # one class: the truth stays green
    save_montage(gt.astype(float), (gt == 2).astype(np.uint8), tmp_path / "one.png", label=(gt == 2).astype(np.uint8),
                 num_slices=1)
    assert drawn["contours"][-1] == ("lime",)
    # class 9 wraps to the first colour, as its legend entry does (CLASS_COLOURS[(9 - 1) % 8])
    nine = np.zeros((12, 12, 3), np.uint8)
    nine[2:5, 2:5, 1] = 9
    save_montage(nine.astype(float), nine, tmp_path / "nine.png", num_slices=1)
    assert sorted(np.unique(drawn["fills"][-1][0]).tolist()) == [-1, 0]


def test_acdc_class_names():
    assert class_names(ACDC_NAMES, 4) == {0: "background", 1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}
    with pytest.raises(ConfigError, match=r"label values \[3\] have no name"):
        class_names({"right_ventricle": 1, "myocardium": 2}, 4)
