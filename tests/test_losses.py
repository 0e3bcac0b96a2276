"""Loss values against hand computations on tiny tensors, edge cases and shape errors."""

import math

import pytest
import torch
from monai.bundle import ConfigParser

import monai_dualssl  # noqa: F401  (registers the short names)
from monai_dualssl.losses import (
    CosineConsistencyLoss,
    CrossConsistencyLoss,
    EntropyFilteredCPSLoss,
    MutualCorrectionLoss,
    PrototypeContrastiveLoss,
    SupervisedLoss,
    _kth_per_class,
    _max,
    lowest_fraction,
    lowest_fraction_per_class,
    sigmoid_rampup,
)


def logits_of(probs):
    """Logits ``[1, C, N]`` whose softmax is ``probs`` (a list of N per-voxel distributions)."""
    return torch.tensor(probs, dtype=torch.float64).log().t().unsqueeze(0)


def ce(p, y):
    return -math.log(p[y])


def ent(p):
    return -sum(q * math.log(q) for q in p)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def tempered(p, t):
    w = [x ** (1.0 / t) for x in p]
    return [x / sum(w) for x in w]


def argmax(p):
    return max(range(len(p)), key=p.__getitem__)


# two networks' probabilities on 5 voxels, for 2 and 3 classes
PA2 = [[0.1, 0.9], [0.8, 0.2], [0.45, 0.55], [0.3, 0.7], [0.95, 0.05]]
PB2 = [[0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.5 - 1e-3, 0.5 + 1e-3], [0.9, 0.1]]
PA3 = [[0.1, 0.7, 0.2], [0.9, 0.05, 0.05], [0.3, 0.2, 0.5], [0.2, 0.65, 0.15], [0.34, 0.33, 0.33]]
PB3 = [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.25, 0.25, 0.5], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100, 0.1) == pytest.approx(0.1 * math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(500, 100, 2.0) == 2.0
    assert sigmoid_rampup(3, 0, 0.5) == 0.5
    assert sigmoid_rampup(0, 1) == pytest.approx(math.exp(-5))  # a ramp of one step still starts low
    assert sigmoid_rampup(0.5, 1, 2.0) == pytest.approx(2.0 * math.exp(-1.25))


def test_mutual_correction_mask_with_more_classes_than_int8_holds():
    # 200 classes: confident class 150 in both (no), 150 vs background (yes), 150 vs 199 (yes), 150 vs unsure (yes)
    def logits(classes):
        z = torch.zeros(1, 200, len(classes))
        for v, c in enumerate(classes):
            if c is not None:
                z[0, c, v] = 20.0
        return z

    mask = MutualCorrectionLoss(threshold=0.6).mask(logits([150, 150, 150, 150]), logits([150, 0, 199, None]))
    assert mask.tolist() == [[[False, True, True, True]]]


def test_channel_max_by_hand_first_index_on_ties():
    # voxels: a clear max in each channel, a tie of channels 1 and 2, a three-way tie, -inf and +inf
    x = torch.tensor([[[1.0, 0.0, 2.0, 5.0, 0.0], [3.0, 4.0, 2.0, 1.0, float("inf")], [2.0, 4.0, 2.0, 0.0, 1.0]]])
    x[0, 0, 1] = float("-inf")
    values, index = _max(x)
    assert values.tolist() == [[3.0, 4.0, 2.0, 5.0, float("inf")]]
    assert index.dtype == torch.long and index.tolist() == [[1, 1, 0, 0, 1]]


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_channel_max_matches_torch_max_in_both_memory_formats(classes):
    g = torch.Generator().manual_seed(classes)
    x = torch.randint(-2, 3, (2, classes, 5, 4, 3), generator=g).float()  # many ties
    expected = x.max(dim=1)
    for t in (x, x.to(memory_format=torch.channels_last_3d)):
        values, index = _max(t)
        assert torch.equal(values, expected.values)
        # the first maximal channel, as argmax documents
        assert torch.equal(index, (x == expected.values.unsqueeze(1)).float().argmax(dim=1))
        narrow = _max(t, torch.int8)[1]
        assert narrow.dtype == torch.int8 and torch.equal(narrow.long(), index)


@pytest.mark.parametrize(
    "values, ratio, kept",
    [
        ([3.0, 1.0, 2.0, 5.0, 4.0], 0.2, [1]),          # ceil(0.2 * 5) = 1: the smallest only
        ([3.0, 1.0, 2.0, 5.0, 4.0], 1e-6, [1]),         # never fewer than one
        ([3.0, 1.0, 2.0, 5.0, 4.0], 0.5, [0, 1, 2]),    # ceil(2.5) = 3
        ([2.0, 1.0, 2.0, 5.0, 2.0], 0.4, [0, 1, 2, 4]),  # the 2nd smallest is 2: every tie is kept
        ([3.0, 1.0, 2.0, 5.0, 4.0], 1.0, [0, 1, 2, 3, 4]),
    ],
)
def test_lowest_fraction_by_hand(values, ratio, kept):
    mask = lowest_fraction(torch.tensor(values).view(1, 1, -1), ratio)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 5)
    assert torch.nonzero(mask.flatten()).flatten().tolist() == kept


def lowest_by_hand(values, classes, ratio, scope):
    """Indices kept: the ceil(ratio * n) lowest values of all (ties kept), or of each class (scope "class")."""
    if scope == "batch":
        kth = sorted(values)[math.ceil(ratio * len(values)) - 1]
        return [v for v in range(len(values)) if values[v] <= kth]
    kept = []
    for c in set(classes):
        members = [v for v in range(len(values)) if classes[v] == c]
        kth = sorted(values[v] for v in members)[math.ceil(ratio * len(members)) - 1]
        kept += [v for v in members if values[v] <= kth]
    return sorted(kept)


@pytest.mark.parametrize(
    "values, classes, ratio, kept",
    [
        ([0.5, 0.1, 0.9, 0.3, 0.7, 0.2], [0, 0, 0, 1, 1, 2], 0.5, [0, 1, 3, 5]),  # ceil(1.5) = 2, ceil(1) = 1, 1
        ([0.5, 0.1, 0.9, 0.3, 0.7, 0.2], [0, 0, 0, 1, 1, 2], 1e-6, [1, 3, 5]),    # one per class present
        ([0.5, 0.1, 0.9, 0.3, 0.7, 0.2], [2, 2, 2, 2, 2, 2], 0.5, [1, 3, 5]),     # one class: as lowest_fraction
        ([0.5, 0.1, 0.9, 0.3, 0.7, 0.2], [3, 0, 3, 0, 3, 0], 0.6, [0, 1, 4, 5]),  # ceil(1.8) = 2 of each; 1, 2 absent
        ([0.5, 0.1, 0.9, 0.3, 0.7, 0.2], [0, 0, 0, 1, 1, 2], 1.0, [0, 1, 2, 3, 4, 5]),
        ([0.5, 0.1, 0.5, 0.3, 0.7, 0.2], [0, 0, 0, 1, 1, 1], 0.5, [0, 1, 2, 3, 5]),  # class 0's 2nd smallest ties
    ],
)
def test_lowest_fraction_per_class_by_hand(values, classes, ratio, kept):
    assert lowest_by_hand(values, classes, ratio, "class") == kept
    mask = lowest_fraction_per_class(torch.tensor(values).view(1, 1, 2, 3), torch.tensor(classes).view(1, 2, 3), 4, ratio)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 2, 3)
    assert torch.nonzero(mask.flatten()).flatten().tolist() == kept


def test_lowest_fraction_per_class_keeps_each_class_share_on_random_data():
    torch.manual_seed(0)
    values, classes = torch.rand(2, 1, 10, 10, 10), torch.randint(0, 3, (2, 10, 10, 10))
    mask = lowest_fraction_per_class(values, classes, 3, 0.8)
    for c in range(3):
        member = (classes == c).flatten()
        v, kept = values.flatten()[member], mask.flatten()[member]
        assert int(kept.sum()) == math.ceil(0.8 * int(member.sum()))
        assert v[kept].max() < v[~kept].min()  # the lowest of the class, not of the batch
    assert torch.equal(lowest_fraction_per_class(values, torch.zeros_like(classes), 3, 0.8), lowest_fraction(values, 0.8))


@pytest.mark.parametrize("n, ratio", [(45, 0.6), (10, 0.3), (1000, 0.7), (7, 1e-6)])
def test_lowest_fraction_per_class_counts_as_lowest_fraction(n, ratio):
    """ceil(ratio * N) in float64 as lowest_fraction's math.ceil: in float32, 0.6 * 45 rounds up to 28."""
    values = torch.randperm(n).float()
    one_class = lowest_fraction_per_class(values, torch.zeros(n, dtype=torch.long), 2, ratio)
    assert int(one_class.sum()) == int(lowest_fraction(values, ratio).sum()) == math.ceil(ratio * n)


@pytest.mark.parametrize("ratio", [1e-6, 0.3, 0.8, 1.0])
def test_per_class_thresholds_by_sort_equal_kthvalue(ratio):
    """The device path (two sorts, for CUDA) and the CPU path (kthvalue per class) find the same thresholds,
    also with many ties and an absent class."""
    torch.manual_seed(1)
    flat, cls = torch.randint(0, 20, (3000,)).float(), torch.randint(0, 4, (3000,))
    cls[cls == 2] = 3  # classes 2 and 4 absent
    counts = torch.bincount(cls, minlength=5)
    k = (ratio * counts).ceil().long()
    by_sort, by_kth = (_kth_per_class(flat, cls, counts, k, sort=s) for s in (True, False))
    present = counts > 0
    assert torch.equal(by_sort[present], by_kth[present])
    for c in torch.nonzero(present).flatten().tolist():
        assert by_kth[c] == flat[cls == c].sort().values[k[c] - 1]


@pytest.mark.parametrize(
    "pa, pb, y, masked",
    [
        # confident fg in both (no), xor (yes), B confident fg / A unsure (yes), both bg (no)
        ([[0.1, 0.9], [0.1, 0.9], [0.45, 0.55], [0.9, 0.1]], [[0.2, 0.8], [0.7, 0.3], [0.3, 0.7], [0.8, 0.2]],
         [1, 0, 1, 0], [1, 2]),
        # 3 classes: confident 1 vs confident 2 (yes), both 0 (no), both unsure 2 (no), both confident 1 (no)
        ([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05], [0.3, 0.2, 0.5], [0.2, 0.65, 0.15]],
         [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.25, 0.25, 0.5], [0.2, 0.6, 0.2]], [1, 0, 2, 1], [0]),
        # 3 classes, no voxel labelled 2: confident 1 vs confident 2 (yes), confident 2 vs confident 0 (yes)
        ([[0.1, 0.7, 0.2], [0.1, 0.15, 0.75]], [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]], [1, 0], [0, 1]),
    ],
)
def test_mutual_correction_by_hand(pa, pb, y, masked):
    za = logits_of(pa).requires_grad_()
    zb = logits_of(pb).requires_grad_()
    target = torch.tensor(y).view(1, 1, -1)
    c = len(pa[0])
    sq = [sum((pa[v][k] - (k == y[v])) ** 2 for k in range(c)) / c for v in masked]
    loss = MutualCorrectionLoss(threshold=0.6)(za, zb, target)
    assert loss.item() == pytest.approx(sum(sq) / len(sq))
    assert MutualCorrectionLoss(reduction="sum")(za, zb, target).item() == pytest.approx(sum(sq))
    per_voxel = MutualCorrectionLoss(reduction="none")(za, zb, target)
    assert per_voxel.shape == (1, 1, len(y))
    assert torch.nonzero(per_voxel[0, 0]).flatten().tolist() == masked
    loss.backward()
    assert za.grad.abs().sum() > 0 and zb.grad is None


def test_per_voxel_maps_of_a_batch():
    """``reduction="none"`` maps are ``[B, 1, *spatial]`` per sample (a batch of 2, each sample by hand)."""
    za = torch.cat([logits_of(PA2), logits_of(PB2)])
    zb = torch.cat([logits_of(PB2), logits_of(PA2)])
    y = [[1, 0, 0, 1, 0], [0, 1, 1, 1, 0]]
    target = torch.tensor(y).view(2, 1, 5)
    hand = [correction_by_hand(PA2, PB2, y[0], 0.6), correction_by_hand(PB2, PA2, y[1], 0.6)]
    mask = MutualCorrectionLoss().mask(za, zb)
    assert mask.shape == (2, 1, 5) and [torch.nonzero(m[0]).flatten().tolist() for m in mask] == [h[0] for h in hand]
    per_voxel = MutualCorrectionLoss(reduction="none")(za, zb, target)
    assert per_voxel.shape == (2, 1, 5)
    for b, (masked, sq) in enumerate(hand):
        assert per_voxel[b, 0, masked].tolist() == pytest.approx(sq)
    all_sq = hand[0][1] + hand[1][1]
    assert MutualCorrectionLoss()(za, zb, target).item() == pytest.approx(sum(all_sq) / len(all_sq))
    cos = CosineConsistencyLoss(reduction="none")(za, zb)
    assert cos.shape == (2, 1, 5)
    for b, (p_b, q_b) in enumerate([(PA2, PB2), (PB2, PA2)]):
        expected = [1 - sum(a * c for a, c in zip(p, q)) / math.hypot(*p) / math.hypot(*q) for p, q in zip(p_b, q_b)]
        assert cos[b, 0].tolist() == pytest.approx(expected)


def correction_by_hand(pa, pb, y, threshold):
    """METHOD.md: masked where the two networks disagree on a confident foreground class
    (argmax c >= 1 with max prob >= threshold); mean over masked voxels of mean_c (p_c - onehot_c)^2."""
    c = len(pa[0])

    def confident(p, k):
        return argmax(p) == k and max(p) >= threshold

    masked = [v for v in range(len(y)) if any(confident(pa[v], k) != confident(pb[v], k) for k in range(1, c))]
    sq = [sum((pa[v][k] - (k == y[v])) ** 2 for k in range(c)) / c for v in masked]
    return masked, sq


# confident background in one network only: no voxel here is corrected (background is not a target)
BACKGROUND_ONLY = (
    [[0.9, 0.1], [0.9, 0.1], [0.95, 0.05], [0.8, 0.1, 0.1]],
    [[0.55, 0.45], [0.45, 0.55], [0.5 - 1e-3, 0.5 + 1e-3], [0.3, 0.3, 0.4]],
)


@pytest.mark.parametrize("index", range(4))
def test_mutual_correction_ignores_confident_background(index):
    pa, pb = [BACKGROUND_ONLY[0][index]], [BACKGROUND_ONLY[1][index]]
    assert correction_by_hand(pa, pb, [0], 0.6)[0] == []
    za, zb = logits_of(pa), logits_of(pb)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert not MutualCorrectionLoss().mask(za, zb).any() and not MutualCorrectionLoss().mask(zb, za).any()
    assert MutualCorrectionLoss(reduction="sum")(za, zb, target).item() == 0.0


def test_mutual_correction_threshold_is_inclusive():
    """A maximum probability equal to the threshold is confident ("max prob >= threshold")."""
    za = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1)  # p_A = (1/4, 3/4): foreground
    zb = torch.tensor([2.0, 0.0]).view(1, 2, 1)  # confident background
    p_fg = torch.softmax(za, dim=1)[0, 1, 0].item()  # 3/4 as float32 computes it
    target = torch.ones(1, 1, 1, dtype=torch.long)
    at = MutualCorrectionLoss(threshold=p_fg)
    above = MutualCorrectionLoss(threshold=p_fg + 1e-6)
    assert at.mask(za, zb).all() and not above.mask(za, zb).any()
    assert at(za, zb, target).item() == pytest.approx(((1 - p_fg) ** 2 + (1 - p_fg) ** 2) / 2)
    assert above(za, zb, target).item() == 0.0


@pytest.mark.parametrize("threshold", [0.6, 0.85])
def test_supervised_loss_passes_its_threshold_on(threshold):
    # v0: both confident fg at 0.6, only A at 0.85; v1: A confident fg at 0.6 only; v2: agree on background
    pa, pb, y = [[0.1, 0.9], [0.3, 0.7], [0.8, 0.2]], [[0.2, 0.8], [0.9, 0.1], [0.9, 0.1]], [1, 0, 0]
    masked, sq = correction_by_hand(pa, pb, y, threshold)
    assert masked == ([1] if threshold == 0.6 else [0])
    za, zb, target = logits_of(pa), logits_of(pb), torch.tensor(y).view(1, 1, -1)
    assert MutualCorrectionLoss(threshold=threshold)(za, zb, target).item() == pytest.approx(sum(sq) / len(sq))
    terms = SupervisedLoss(alpha=1.0, threshold=threshold).terms(za, target, zb)
    assert terms["corr"].item() == pytest.approx(sum(sq) / len(sq))
    total = SupervisedLoss(alpha=2.0, threshold=threshold)(za, target, zb)
    assert total.item() == pytest.approx(terms["ce"].item() + terms["dice"].item() + 2.0 * sum(sq) / len(sq))


def test_mutual_correction_empty_mask_is_zero():
    z = logits_of(PA2)
    assert MutualCorrectionLoss()(z, z.clone(), torch.zeros(1, 1, 5, dtype=torch.long)).item() == 0.0


def test_supervised_by_hand():
    za, zb = logits_of(PA2), logits_of(PB2)
    y = [1, 0, 0, 1, 0]
    target = torch.tensor(y).view(1, 1, -1)
    ce_ = sum(ce(PA2[v], y[v]) for v in range(5)) / 5
    inter = sum(PA2[v][1] * y[v] for v in range(5))
    dice = 1 - (2 * inter + 1e-5) / (sum(p[1] for p in PA2) + sum(y) + 1e-5)
    loss = SupervisedLoss(alpha=0.0)
    assert loss(za, target).item() == pytest.approx(ce_ + dice, rel=1e-6)
    terms = SupervisedLoss(alpha=0.5).terms(za, target, zb)
    corr = MutualCorrectionLoss()(za, zb, target)
    assert terms["ce"].item() == pytest.approx(ce_) and terms["dice"].item() == pytest.approx(dice, rel=1e-6)
    assert SupervisedLoss()(za, target, zb).item() == pytest.approx(ce_ + dice + 0.5 * corr.item())  # alpha 0.5
    # every class in the Dice term, and summed reductions
    dice_bg = 1 - (2 * sum(PA2[v][0] * (1 - y[v]) for v in range(5)) + 1e-5) / (sum(p[0] for p in PA2) + 5 - sum(y) + 1e-5)
    with_bg = SupervisedLoss(include_background=True).terms(za, target)
    assert with_bg["dice"].item() == pytest.approx((dice + dice_bg) / 2, rel=1e-6)
    summed = SupervisedLoss(reduction="sum", threshold=0.52).terms(za, target, zb)
    masked, sq = correction_by_hand(PA2, PB2, y, 0.52)  # (0.6 would sit on voxel 1's probability)
    assert masked == [1, 2, 3] and summed["ce"].item() == pytest.approx(5 * ce_)
    assert summed["corr"].item() == pytest.approx(sum(sq))
    # no correction term at alpha = 0 (it is not computed, not just weighted by 0)
    assert SupervisedLoss(alpha=0.0, threshold=0.52).terms(za, target, zb)["corr"].item() == 0.0


def cps_by_hand(student, teacher, keep_ratio, t, kl_weighting, rule="certain", scope="batch"):
    n = len(student)
    h = [ent(p) if rule == "certain" else -ent(p) for p in teacher]
    kept = lowest_by_hand(h, [argmax(p) for p in teacher], keep_ratio, scope)
    total = 0.0
    for v in range(n):
        d = kl(tempered(teacher[v], t), tempered(student[v], t)) if kl_weighting else 0.0
        w = math.exp(-d)
        if v in kept:
            total += n / len(kept) * w * ce(student[v], argmax(teacher[v]))
        total += d
    return total / n, kept


@pytest.mark.parametrize("scope", ["batch", "class"])
@pytest.mark.parametrize("pa, pb", [(PA2, PB2), (PA3, PB3)])
@pytest.mark.parametrize("keep_ratio, t, kl_weighting", [(0.6, 1.0, True), (0.6, 2.0, True), (1.0, 0.5, True), (0.4, 1.0, False)])
def test_cross_consistency_by_hand(pa, pb, keep_ratio, t, kl_weighting, scope):
    expected = sum(cps_by_hand(s, q, keep_ratio, t, kl_weighting, scope=scope)[0] for s, q in ((pa, pb), (pb, pa)))
    loss = CrossConsistencyLoss(keep_ratio=keep_ratio, temperature=t, kl_weighting=kl_weighting, filter_scope=scope)
    assert loss(logits_of(pa), logits_of(pb)).item() == pytest.approx(expected, rel=1e-6)


def test_filter_scope_changes_the_kept_voxels():
    # PB3's pseudo-labels 2, 0, 2, 1, 2: over the batch the 3 lowest entropies (voxels 0, 1, 4: equal), per class
    # the 2 lowest of class 2 (0, 4) and the only voxel of classes 0 (1) and 1 (3)
    kept = {s: CrossConsistencyLoss(keep_ratio=0.6, filter_scope=s).kept(logits_of(PB3))[0, 0] for s in ("batch", "class")}
    assert torch.nonzero(kept["batch"]).flatten().tolist() == [0, 1, 4]
    assert torch.nonzero(kept["class"]).flatten().tolist() == [0, 1, 3, 4]


def test_filter_rule_and_kept_voxels():
    zb = logits_of(PB3)
    for rule in ("certain", "uncertain"):
        kept = CrossConsistencyLoss(keep_ratio=0.6, filter_rule=rule).kept(zb)[0, 0]
        assert torch.nonzero(kept).flatten().tolist() == cps_by_hand(PA3, PB3, 0.6, 1.0, False, rule)[1]
    expected = cps_by_hand(PA3, PB3, 0.6, 1, True, "uncertain")[0] + cps_by_hand(PB3, PA3, 0.6, 1, True, "uncertain")[0]
    got = CrossConsistencyLoss(keep_ratio=0.6, filter_rule="uncertain")(logits_of(PA3), logits_of(PB3))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_keep_ratio_changes_voxels_and_rescales():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 6, 6, 4)
    kept = [CrossConsistencyLoss(keep_ratio=r).kept(teacher) for r in (0.25, 0.5, 0.8)]
    assert [int(k.sum()) for k in kept] == [72, 144, 231]
    assert torch.all(kept[0] <= kept[1]) and torch.all(kept[1] <= kept[2])
    # a student with the same CE everywhere: the N/|K| rescaling makes the value independent of keep_ratio
    student = torch.zeros(2, 3, 6, 6, 4)
    values = [EntropyFilteredCPSLoss(keep_ratio=r).one_way(student, teacher).mean().item() for r in (0.25, 0.5, 1.0)]
    assert values == pytest.approx([math.log(3)] * 3)


def test_temperature_changes_result():
    torch.manual_seed(1)
    za, zb = torch.randn(2, 2, 8, 8, 8), torch.randn(2, 2, 8, 8, 8)
    values = {t: CrossConsistencyLoss(temperature=t)(za, zb).item() for t in (0.5, 1.0, 4.0)}
    assert len(set(round(v, 6) for v in values.values())) == 3


def test_cps_pseudo_labels_valid_for_three_classes():
    # every voxel of class 2: with an ignore index of 2 (the released code) nothing would be learned
    teacher = torch.zeros(1, 3, 4, 4, 4)
    teacher[:, 2] = 5.0
    student = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    loss = EntropyFilteredCPSLoss(keep_ratio=0.5).one_way(student, teacher)
    assert loss.mean().item() == pytest.approx(math.log(3))
    loss.mean().backward()
    assert student.grad[:, 2].lt(0).all()  # pushed toward class 2


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cps_reductions(reduction):
    za, zb = logits_of(PA2), logits_of(PB2)
    mean = CrossConsistencyLoss()(za, zb)
    other = CrossConsistencyLoss(reduction=reduction)(za, zb)
    if reduction == "none":
        assert other.shape == (1, 1, 5)
    assert other.sum().item() == pytest.approx(mean.item() * 5)


def one_way_by_hand(z_student, p_teacher, frozen_weight=None):
    """One voxel of one direction, every voxel kept, T = 1: ``w CE(z, argmax q) + D`` with
    ``D = KL(q || softmax(z))`` and ``w = exp(-D)`` (or the constant ``frozen_weight``)."""
    s = [math.exp(x) for x in z_student]
    p = [x / sum(s) for x in s]
    d = kl(p_teacher, p)
    w = math.exp(-d) if frozen_weight is None else frozen_weight
    return w * ce(p, argmax(p_teacher)) + d


def numeric_grad(f, z, h=1e-6):
    return [(f(z[:i] + [x + h] + z[i + 1:]) - f(z[:i] + [x - h] + z[i + 1:])) / (2 * h) for i, x in enumerate(z)]


@pytest.mark.parametrize("detach", [None, False, True])  # None: the default
def test_kl_weight_gradient_by_hand(detach):
    """Not detached (Zheng & Yang, the default): the gradient is the derivative of ``w CE + D``.
    Detached: ``w`` is a constant, the gradient is that of ``w_0 CE + D``."""
    student = [[-0.5, 0.8], [1.5, -0.4], [0.9, -0.7], [-1.0, 0.6]]  # each disagrees with its teacher
    teacher = [[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]]
    za = torch.tensor(student, dtype=torch.float64).t().unsqueeze(0).requires_grad_()
    kwargs = {} if detach is None else {"detach_weight": detach}
    value = CrossConsistencyLoss(entropy_filter=False, **kwargs).one_way(za, logits_of(teacher))
    value.sum().backward()
    for v, (z, q) in enumerate(zip(student, teacher)):
        assert value[0, 0, v].item() == pytest.approx(one_way_by_hand(z, q), rel=1e-6)
        w0 = math.exp(-one_way_by_hand(z, q, frozen_weight=0.0))  # with w = 0 the value is D
        full = numeric_grad(lambda x: one_way_by_hand(x, q), z)
        frozen = numeric_grad(lambda x: one_way_by_hand(x, q, frozen_weight=w0), z)
        assert abs(full[0] - frozen[0]) > 0.3  # the weight's own gradient, -w CE dD/dz, is large here
        expected = frozen if detach else full
        assert za.grad[0, :, v].tolist() == pytest.approx(expected, abs=1e-5), v


def test_single_kept_voxel_carries_the_whole_scale():
    """With one voxel kept its CE is scaled by N / |K| = N (teacher PB2: voxel 4 has the lowest entropy)."""
    loss = EntropyFilteredCPSLoss(keep_ratio=1e-6)
    one_way = loss.one_way(logits_of(PA2), logits_of(PB2))
    assert one_way.shape == (1, 1, 5) and one_way[0, 0, :4].abs().sum().item() == 0.0
    assert one_way[0, 0, 4].item() == pytest.approx(5 * ce(PA2[4], argmax(PB2[4])), rel=1e-6)


def test_one_way_after_forward():
    """The per-direction map stays usable after a call of the loss (the KL statistics are reset, not broken)."""
    loss = CrossConsistencyLoss(keep_ratio=1.0)
    za, zb = logits_of(PA2), logits_of(PB2)
    both = loss(za, zb)
    alone = cps_by_hand(PA2, PB2, 1.0, 1.0, True)[0]
    assert loss.one_way(za, zb).mean().item() == pytest.approx(alone, rel=1e-6)
    assert loss(za, zb).item() == pytest.approx(both.item()) and set(loss.stats) == {"kl_w_mean", "kl_w_std", "kl_mean"}


def test_entropy_filter_off_keeps_every_voxel():
    torch.manual_seed(0)
    za, zb = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    for loss in (CrossConsistencyLoss(keep_ratio=0.3, entropy_filter=False),
                 EntropyFilteredCPSLoss(keep_ratio=0.3, entropy_filter=False)):
        kept = loss.kept(zb)
        assert kept.dtype == torch.bool and kept.shape == (2, 1, 4, 4, 4) and kept.all()
    plain = torch.nn.functional.cross_entropy(za, zb.argmax(1), reduction="none")
    one_way = EntropyFilteredCPSLoss(keep_ratio=0.3, entropy_filter=False).one_way(za, zb)
    assert one_way.shape == (2, 1, 4, 4, 4) and torch.allclose(one_way[:, 0], plain, atol=1e-6)
    full = CrossConsistencyLoss(keep_ratio=1.0, reduction="none")(za, zb)
    assert full.shape == (2, 1, 4, 4, 4)
    assert torch.equal(CrossConsistencyLoss(keep_ratio=0.3, entropy_filter=False, reduction="none")(za, zb), full)


def test_entropy_filtered_cps_by_hand_and_defaults():
    """EntropyFilteredCPSLoss is CrossConsistencyLoss without the KL weighting, and passes its arguments on;
    its default keeps the 80 % lowest-entropy voxels (METHOD.md)."""
    expected = cps_by_hand(PA3, PB3, 0.8, 1.0, False)[0] + cps_by_hand(PB3, PA3, 0.8, 1.0, False)[0]
    za, zb = logits_of(PA3), logits_of(PB3)
    assert EntropyFilteredCPSLoss()(za, zb).item() == pytest.approx(expected, rel=1e-6)
    assert EntropyFilteredCPSLoss(reduction="sum")(za, zb).item() == pytest.approx(5 * expected, rel=1e-6)
    assert EntropyFilteredCPSLoss(reduction="none")(za, zb).shape == (1, 1, 5)
    uncertain = cps_by_hand(PA3, PB3, 0.6, 1.0, False, "uncertain")[0] + cps_by_hand(PB3, PA3, 0.6, 1.0, False, "uncertain")[0]
    assert EntropyFilteredCPSLoss(0.6, "uncertain")(za, zb).item() == pytest.approx(uncertain, rel=1e-6)
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 10, 10, 10)
    assert int(EntropyFilteredCPSLoss().kept(teacher).sum()) == 1600  # ceil(0.8 * 2000)
    assert int(CrossConsistencyLoss().kept(teacher).sum()) == 1600


def prototype_by_hand(feats, pseudo, reliable, tau):
    norm = [[x / math.hypot(*f) for x in f] for f in feats]
    protos = {}
    for c in set(pseudo[v] for v in reliable):
        s = [sum(norm[v][i] for v in reliable if pseudo[v] == c) for i in range(len(feats[0]))]
        protos[c] = [x / math.hypot(*s) for x in s]
    losses = []
    for v in range(len(feats)):
        if v in reliable or pseudo[v] not in protos:
            continue
        sims = {c: sum(a * b for a, b in zip(norm[v], p)) / tau for c, p in protos.items()}
        losses.append(-sims[pseudo[v]] + math.log(sum(math.exp(s) for s in sims.values())))
    assert losses, "the example must have uncertain voxels of a class with a prototype"
    return sum(losses) / len(losses)


# 3 classes: voxels 0 and 1 reliable (classes 0, 1), 2-4 uncertain (the networks disagree); voxel 2's
# pseudo-label is class 2, which has no reliable voxel, hence no prototype: it is skipped
NO_PROTO_A = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1], [0.6, 0.3, 0.1]]
NO_PROTO_B = [[0.85, 0.1, 0.05], [0.1, 0.85, 0.05], [0.5, 0.25, 0.25], [0.3, 0.6, 0.1], [0.4, 0.5, 0.1]]
# a confident majority class and a less confident small one (both networks agree): the batch's 3 lowest entropies
# are all class 0, so class 1 gets no prototype; per class, voxels 0, 1 (class 0) and 3, 4 (class 1) are reliable
SMALL_CLASS = [[0.95, 0.05], [0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.4, 0.6]]


@pytest.mark.parametrize("layout", ["[1, C, 5]", "[1, C, 1, 5]"])
@pytest.mark.parametrize(
    "pa, pb, keep_ratio, scope",
    [
        (PA2, PB2, 0.6, "batch"),
        (PA3, PB3, 1.0, "batch"),
        (NO_PROTO_A, NO_PROTO_B, 1.0, "batch"),
        (SMALL_CLASS, SMALL_CLASS, 0.6, "class"),
    ],
)
def test_prototype_by_hand(pa, pb, keep_ratio, scope, layout):
    feats = [[1.0, 0.5], [-0.3, 1.0], [0.2, -0.8], [0.7, 0.7], [-1.0, 0.1]]
    mean = [[(a + b) / 2 for a, b in zip(p, q)] for p, q in zip(pa, pb)]
    pseudo = [argmax(p) for p in mean]
    low = lowest_by_hand([ent(p) for p in mean], pseudo, keep_ratio, scope)
    reliable = [v for v in low if argmax(pa[v]) == pseudo[v] == argmax(pb[v])]
    expected = prototype_by_hand(feats, pseudo, reliable, 0.1)
    if pa is NO_PROTO_A:
        assert reliable == [0, 1] and pseudo[2] == 2
    if pa is SMALL_CLASS:
        assert reliable == [0, 1, 3, 4]
    shape = (1, -1, 5) if layout == "[1, C, 5]" else (1, -1, 1, 5)
    f = torch.tensor(feats, dtype=torch.float64).t().reshape(shape).requires_grad_()
    loss = PrototypeContrastiveLoss(keep_ratio=keep_ratio, sample_ratio=1.0, min_samples=1, filter_scope=scope)
    value = loss(f, logits_of(pa).reshape(shape), logits_of(pb).reshape(shape))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    reliable_grad = f.grad.reshape(1, -1, 5)[0, :, reliable].abs().sum()
    assert f.grad.abs().sum() > 0 and reliable_grad == 0  # prototypes are detached


def test_batch_scope_leaves_a_small_class_without_prototype():
    f = torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.2, -0.8], [0.7, 0.7], [-1.0, 0.1]]).t().reshape(1, 2, 5)
    z = logits_of(SMALL_CLASS).float()
    loss = {s: PrototypeContrastiveLoss(keep_ratio=0.6, sample_ratio=1.0, min_samples=1, filter_scope=s)(f, z, z)
            for s in ("batch", "class")}
    assert loss["batch"].item() == 0.0 and loss["class"].item() > 0.1
    for cls in (PrototypeContrastiveLoss, CrossConsistencyLoss, EntropyFilteredCPSLoss):
        with pytest.raises(ValueError, match="filter_scope must be 'batch' or 'class', found 'voxel'"):
            cls(filter_scope="voxel")


def test_prototype_keeps_tensors_on_the_input_device():
    """Meta tensors stand in for a GPU: any tensor created on the CPU inside the loss fails against them."""
    loss = PrototypeContrastiveLoss(min_samples=4)
    forward = getattr(PrototypeContrastiveLoss.forward, "__wrapped__", PrototypeContrastiveLoss.forward)  # no autocast
    feats, logits = torch.empty(2, 4, 8, 8, 8, device="meta"), torch.empty(2, 2, 8, 8, 8, device="meta")
    for reduction, scope in (("mean", "batch"), ("none", "batch"), ("mean", "class")):
        loss.reduction, loss.filter_scope = reduction, scope
        assert forward(loss, feats, logits, logits).device.type == "meta"


def test_prototype_sampling_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, 16)
    feats = torch.randn(2, 8, 16, 16, 16)
    loss = PrototypeContrastiveLoss(keep_ratio=0.5, sample_ratio=0.01, min_samples=10, max_samples=100, reduction="none")
    per_sample = loss(feats, logits)
    assert per_sample.shape == (100,)
    assert int((per_sample > 0).sum()) == 41  # ceil(0.01 * 4096 uncertain voxels)


@pytest.mark.parametrize(
    "size, kwargs, n_valid",
    [
        (32, {}, 132),  # 20 % of 65536 voxels uncertain -> ceil(0.01 * 13107) = 132 samples
        (16, {}, 64),  # ceil(0.01 * 1638) = 17 -> at least min_samples = 64
        (16, {"min_samples": 50}, 50),
        (16, {"keep_ratio": 0.5, "sample_ratio": 0.02}, 82),  # ceil(0.02 * 4096)
    ],
)
def test_prototype_sample_counts_and_defaults(size, kwargs, n_valid):
    """METHOD.md's defaults: 80 % of the voxels may be reliable, 1 % of the uncertain ones are sampled,
    at least 64 and at most 4096 (``reduction="none"`` returns one entry per possible sample)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 2, size, size, size)
    feats = torch.randn(2, 4, size, size, size)
    values = {}
    for reduction in ("none", "sum", "mean"):
        torch.manual_seed(1)  # the same samples for each reduction
        values[reduction] = PrototypeContrastiveLoss(reduction=reduction, **kwargs)(feats, logits)
    assert values["none"].shape == (4096,) and values["none"].sum().item() == pytest.approx(values["sum"].item())
    assert values["sum"].item() / values["mean"].item() == pytest.approx(n_valid)  # mean over the valid samples


def test_cosine_by_hand():
    za, zb = logits_of(PA3), logits_of(PB3)
    cos = [sum(a * b for a, b in zip(p, q)) / math.hypot(*p) / math.hypot(*q) for p, q in zip(PA3, PB3)]
    assert CosineConsistencyLoss()(za, zb).item() == pytest.approx(sum(1 - c for c in cos) / 5)
    assert CosineConsistencyLoss(reduction="none")(za, zb).shape == (1, 1, 5)


LOW_PRECISION_TERMS = {  # name: loss of (z_a, z_b, features, label)
    "correction": lambda za, zb, f, y: MutualCorrectionLoss(threshold=0.5)(za, zb, y),
    "supervised": lambda za, zb, f, y: SupervisedLoss(threshold=0.5)(za, y, zb),
    "supervised terms": lambda za, zb, f, y: sum(SupervisedLoss().terms(za, y, None).values()),
    "supervised, keywords": lambda za, zb, f, y: SupervisedLoss(threshold=0.5)(input=za, target=y, other=zb),
    "cosine, keywords": lambda za, zb, f, y: CosineConsistencyLoss()(input=za, other=zb),
    "cross consistency": lambda za, zb, f, y: CrossConsistencyLoss(temperature=2.0)(za, zb),
    "entropy-filtered cps": lambda za, zb, f, y: EntropyFilteredCPSLoss()(za, zb),
    "kept": lambda za, zb, f, y: CrossConsistencyLoss().kept(za).float().mean(),
    "prototype": lambda za, zb, f, y: PrototypeContrastiveLoss(min_samples=8)(f, za, zb),
    "cosine": lambda za, zb, f, y: CosineConsistencyLoss()(za, zb),
}


@pytest.mark.parametrize("mode", ["float16 inputs", "bfloat16 autocast"])
@pytest.mark.parametrize("term", list(LOW_PRECISION_TERMS))
def test_low_precision_computes_in_float32(term, mode):
    """float16 logits, or float32 logits under CPU autocast, give the float32 value as float32 (small tensors;
    test_amp.py checks the paper's patch size)."""
    torch.manual_seed(0)
    za, zb = (3 * torch.randn(2, 3, 6, 6, 4)).half().float(), (3 * torch.randn(2, 3, 6, 6, 4)).half().float()
    feats = torch.randn(2, 4, 6, 6, 4).half().float()
    y = torch.randint(0, 3, (2, 1, 6, 6, 4))
    fn = LOW_PRECISION_TERMS[term]
    torch.manual_seed(1)  # the prototype term samples voxels
    reference = fn(za, zb, feats, y)
    torch.manual_seed(1)
    if mode == "float16 inputs":
        value = fn(za.half(), zb.half(), feats.half(), y)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = fn(za, zb, feats, y)
    assert value.dtype == torch.float32 and reference.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_logits_are_finite(scale):
    torch.manual_seed(0)
    za = (torch.randn(2, 3, 8, 8, 8).sign() * scale).requires_grad_()
    zb = (torch.randn(2, 3, 8, 8, 8).sign() * scale).requires_grad_()
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    feats = torch.randn(2, 4, 8, 8, 8, requires_grad=True)
    values = [
        SupervisedLoss()(za, target, zb),
        CrossConsistencyLoss(temperature=0.5)(za, zb),
        EntropyFilteredCPSLoss()(za, zb),
        PrototypeContrastiveLoss()(feats, za, zb),
        CosineConsistencyLoss()(za, zb),
    ]
    total = sum(values)
    total.backward()
    assert all(torch.isfinite(v) for v in values)
    assert all(torch.isfinite(t.grad).all() for t in (za, zb, feats))


def test_single_class_batch_and_no_uncertain_voxel():
    z = torch.zeros(1, 2, 8, 8, 8)
    z[:, 0] = 8.0  # every voxel confidently background
    feats = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    assert PrototypeContrastiveLoss(keep_ratio=1.0)(feats, z, z).item() == 0.0  # nothing uncertain
    value = PrototypeContrastiveLoss(keep_ratio=0.5)(feats, z, z)  # only one prototype present
    assert torch.isfinite(value) and value.item() == pytest.approx(0.0, abs=1e-6)
    value.backward()
    assert torch.isfinite(feats.grad).all()
    assert torch.isfinite(CrossConsistencyLoss()(z, z)) and torch.isfinite(SupervisedLoss()(z, torch.zeros(1, 1, 8, 8, 8), z))


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda: CrossConsistencyLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5)), r"\(1, 2, 4, 4\).*\(1, 2, 4, 5\)"),
        (lambda: CosineConsistencyLoss()(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4)), r"\(1, 2, 4\).*\(1, 3, 4\)"),
        (lambda: SupervisedLoss()(torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 4)), r"\(2, 1, 4, 4\).*\(2, 4, 4\)"),
        (lambda: MutualCorrectionLoss()(torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), torch.zeros(1, 1, 4)), r"\(1, 2, 3\)"),
        (lambda: PrototypeContrastiveLoss()(torch.zeros(1, 4, 3, 3), torch.zeros(1, 2, 4, 4)), r"\[1, F, 4, 4\].*\(1, 4, 3, 3\)"),
        (lambda: CrossConsistencyLoss()(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)), r"C >= 2.*\(1, 1, 4\)"),
        (lambda: CrossConsistencyLoss(keep_ratio=0.0), "keep_ratio"),
        (lambda: CrossConsistencyLoss(temperature=0.0), "temperature"),
        (lambda: CrossConsistencyLoss(filter_rule="top"), "filter_rule"),
        (lambda: PrototypeContrastiveLoss(min_samples=10, max_samples=5), "min_samples"),
        (lambda: PrototypeContrastiveLoss(min_samples=0), r"need 1 <= min_samples <= max_samples, found 0, 4096"),
        (lambda: CrossConsistencyLoss(keep_ratio=1.01), r"keep_ratio must be in \(0, 1\], found 1.01"),
        (lambda: MutualCorrectionLoss(threshold=1.5), r"threshold must be in \[0, 1\], found 1.5"),
        (lambda: MutualCorrectionLoss(threshold=-0.1), r"threshold must be in \[0, 1\], found -0.1"),
        (lambda: SupervisedLoss(threshold=1.5), r"threshold must be in \[0, 1\], found 1.5"),
        (lambda: SupervisedLoss(alpha=-1.0), r"alpha must be >= 0, found -1.0"),
        (lambda: PrototypeContrastiveLoss(temperature=0.0), r"temperature must be > 0, found 0.0"),
        (lambda: PrototypeContrastiveLoss(keep_ratio=0.0), r"keep_ratio and sample_ratio must be in \(0, 1\], found 0.0, 0.01"),
        (lambda: PrototypeContrastiveLoss(keep_ratio=1.5), r"found 1.5, 0.01"),
        (lambda: PrototypeContrastiveLoss(sample_ratio=0.0), r"found 0.8, 0.0"),
        (lambda: PrototypeContrastiveLoss(sample_ratio=1.5), r"found 0.8, 1.5"),
    ],
)
def test_bad_input_raises(call, expected):
    with pytest.raises(ValueError, match=expected):
        call()


def zeros(*shape):
    return torch.zeros(*shape)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: MutualCorrectionLoss()(zeros(1, 1, 4), zeros(1, 1, 4), zeros(1, 1, 4)),
         "MutualCorrectionLoss: expected logits of shape [B, C, *spatial] with C >= 2, found shape (1, 1, 4)."),
        (lambda: MutualCorrectionLoss()(zeros(1, 2, 4), zeros(1, 2, 3), zeros(1, 1, 4)),
         "MutualCorrectionLoss: expected other of shape (1, 2, 4) (same as input), found (1, 2, 3)."),
        (lambda: MutualCorrectionLoss()(zeros(1, 2, 4), zeros(1, 2, 4), zeros(1, 4)),
         "MutualCorrectionLoss: expected target of shape (1, 1, 4) (class indices, channel first), found (1, 4)."),
        (lambda: SupervisedLoss()(zeros(2, 1, 4), zeros(2, 1, 4)),
         "SupervisedLoss: expected logits of shape [B, C, *spatial] with C >= 2, found shape (2, 1, 4)."),
        (lambda: SupervisedLoss()(zeros(2, 2, 4, 4), zeros(2, 4, 4)),
         "SupervisedLoss: expected target of shape (2, 1, 4, 4) (class indices, channel first), found (2, 4, 4)."),
        (lambda: CrossConsistencyLoss()(zeros(1, 1, 4), zeros(1, 1, 4)),
         "CrossConsistencyLoss: expected logits of shape [B, C, *spatial] with C >= 2, found shape (1, 1, 4)."),
        (lambda: CrossConsistencyLoss()(zeros(1, 2, 4, 4), zeros(1, 2, 4, 5)),
         "CrossConsistencyLoss: expected other of shape (1, 2, 4, 4) (same as input), found (1, 2, 4, 5)."),
        (lambda: EntropyFilteredCPSLoss()(zeros(1, 1, 4), zeros(1, 1, 4)),
         "EntropyFilteredCPSLoss: expected logits of shape [B, C, *spatial] with C >= 2, found shape (1, 1, 4)."),
        (lambda: EntropyFilteredCPSLoss()(zeros(1, 2, 4, 4), zeros(1, 2, 4, 5)),
         "EntropyFilteredCPSLoss: expected other of shape (1, 2, 4, 4) (same as input), found (1, 2, 4, 5)."),
        (lambda: PrototypeContrastiveLoss()(zeros(1, 4, 4), zeros(1, 1, 4)),
         "PrototypeContrastiveLoss: expected logits of shape [B, C, *spatial] with C >= 2, found shape (1, 1, 4)."),
        (lambda: PrototypeContrastiveLoss()(zeros(1, 4, 4), zeros(1, 2, 4), zeros(1, 3, 4)),
         "PrototypeContrastiveLoss: expected logits_other of shape (1, 2, 4) (same as input), found (1, 3, 4)."),
        (lambda: PrototypeContrastiveLoss()(zeros(2, 4, 4, 4), zeros(1, 2, 4, 4)),
         "PrototypeContrastiveLoss: expected features of shape [1, F, 4, 4], found (2, 4, 4, 4)."),
        (lambda: PrototypeContrastiveLoss()(zeros(1, 4, 4, 4), zeros(1, 2, 4, 4, 1)),
         "PrototypeContrastiveLoss: expected features of shape [1, F, 4, 4, 1], found (1, 4, 4, 4)."),
        (lambda: CosineConsistencyLoss()(zeros(1, 1, 4), zeros(1, 1, 4)),
         "CosineConsistencyLoss: expected logits of shape [B, C, *spatial] with C >= 2, found shape (1, 1, 4)."),
        (lambda: CosineConsistencyLoss()(zeros(1, 2, 4), zeros(1, 3, 4)),
         "CosineConsistencyLoss: expected other of shape (1, 2, 4) (same as input), found (1, 3, 4)."),
    ],
)
def test_shape_errors_name_the_loss_and_the_input(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_boundary_arguments_are_accepted():
    """The documented ranges are closed where the docstrings say so."""
    z = logits_of(PA2)
    target = torch.zeros(1, 1, 5, dtype=torch.long)
    for threshold in (0.0, 1.0):
        assert torch.isfinite(MutualCorrectionLoss(threshold=threshold)(z, logits_of(PB2), target))
    assert SupervisedLoss(alpha=0.0)(z, target, logits_of(PB2)).item() == pytest.approx(SupervisedLoss(alpha=0.0)(z, target).item())
    assert CrossConsistencyLoss(keep_ratio=1.0).keep_ratio == 1.0
    loss = PrototypeContrastiveLoss(keep_ratio=1.0, sample_ratio=1.0, min_samples=5, max_samples=5)
    assert (loss.min_samples, loss.max_samples) == (5, 5)


def test_losses_instantiate_from_bundle_config_by_short_name():
    names = ["SupervisedLoss", "MutualCorrectionLoss", "CrossConsistencyLoss", "EntropyFilteredCPSLoss",
             "PrototypeContrastiveLoss", "CosineConsistencyLoss"]
    config = {"imports": ["$import monai_dualssl"]}
    config.update({n: {"_target_": n} for n in names})
    config["CrossConsistencyLoss"]["temperature"] = 2.0
    parser = ConfigParser(config)
    for n in names:
        assert type(parser.get_parsed_content(n)).__name__ == n
    assert parser.get_parsed_content("CrossConsistencyLoss").temperature == 2.0


@pytest.mark.parametrize("override", [{}, {"filter_scope": "batch"}])
def test_train_config_passes_filter_scope_to_both_losses(override):
    from conftest import CONFIGS

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"bundle_root": str(CONFIGS.parent), **override})
    scope = override.get("filter_scope", "class")  # train.yaml's default; batch: the paper's rule
    assert parser.get_parsed_content("train#cps_loss").filter_scope == scope
    assert parser.get_parsed_content("train#proto_loss").filter_scope == scope


def test_kl_rectification_switch_and_weight_statistics():
    """Two voxels, both directions, no filter: loss = mean_v sum_dir (w CE + [rectify] D); stats of w by hand."""
    za = torch.tensor([[[2.0, -1.0], [0.0, 1.0]]]).reshape(1, 2, 2, 1, 1)   # voxel 0: class 0, voxel 1: class 1
    zb = torch.tensor([[[1.0, 0.5], [0.0, -0.5]]]).reshape(1, 2, 2, 1, 1)   # voxel 0: class 0, voxel 1: class 0
    pa, pb = torch.softmax(za, 1).flatten(2)[0], torch.softmax(zb, 1).flatten(2)[0]   # [C, V]
    ce_a = -torch.log(pa[pb.argmax(0), torch.arange(2)])        # A taught by argmax p_B
    ce_b = -torch.log(pb[pa.argmax(0), torch.arange(2)])
    d_a = (pb * (pb.log() - pa.log())).sum(0)                   # KL(p_B || p_A): B teaches A
    d_b = (pa * (pa.log() - pb.log())).sum(0)
    w = torch.cat([torch.exp(-d_a), torch.exp(-d_b)])
    with_d = ((torch.exp(-d_a) * ce_a + d_a) + (torch.exp(-d_b) * ce_b + d_b)).mean()
    without_d = (torch.exp(-d_a) * ce_a + torch.exp(-d_b) * ce_b).mean()
    for rectify, expected in ((True, with_d), (False, without_d)):
        loss = CrossConsistencyLoss(entropy_filter=False, kl_rectify=rectify)
        assert float(loss(za, zb)) == pytest.approx(float(expected), rel=1e-5)
        assert float(loss.stats["kl_w_mean"]) == pytest.approx(float(w.mean()), rel=1e-5)
        assert float(loss.stats["kl_w_std"]) == pytest.approx(float(w.std(unbiased=False)), rel=1e-4)
        assert float(loss.stats["kl_mean"]) == pytest.approx(float(torch.cat([d_a, d_b]).mean()), rel=1e-5)
    assert CrossConsistencyLoss(kl_weighting=False)(za, zb) is not None
    assert CrossConsistencyLoss(kl_weighting=False).stats == {}


def test_kl_weight_statistics_cover_only_the_kept_voxels():
    za = torch.tensor([[[3.0, 0.1], [0.0, 0.0]]]).reshape(1, 2, 2, 1, 1)   # A sure at voxel 0, unsure at 1
    zb = torch.tensor([[[0.2, -2.5], [0.0, 0.0]]]).reshape(1, 2, 2, 1, 1)  # B unsure at 0, sure at 1
    pa, pb = torch.softmax(za, 1).flatten(2)[0], torch.softmax(zb, 1).flatten(2)[0]
    w_a = torch.exp(-(pb * (pb.log() - pa.log())).sum(0))   # B teaches A: B is sure at voxel 1 -> kept
    w_b = torch.exp(-(pa * (pa.log() - pb.log())).sum(0))   # A teaches B: A is sure at voxel 0 -> kept
    loss = CrossConsistencyLoss(keep_ratio=0.5)
    loss(za, zb)
    kept = torch.stack([w_a[1], w_b[0]])
    assert float(loss.stats["kl_w_mean"]) == pytest.approx(float(kept.mean()), rel=1e-5)
    assert float(loss.stats["kl_w_std"]) == pytest.approx(float(kept.std(unbiased=False)), rel=1e-4)
