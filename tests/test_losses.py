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


@pytest.mark.parametrize(
    "pa, pb, y, masked",
    [
        # confident fg in both (no), xor (yes), B confident fg / A unsure (yes), both bg (no)
        ([[0.1, 0.9], [0.1, 0.9], [0.45, 0.55], [0.9, 0.1]], [[0.2, 0.8], [0.7, 0.3], [0.3, 0.7], [0.8, 0.2]],
         [1, 0, 1, 0], [1, 2]),
        # 3 classes: confident 1 vs confident 2 (yes), both 0 (no), both unsure 2 (no), both confident 1 (no)
        ([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05], [0.3, 0.2, 0.5], [0.2, 0.65, 0.15]],
         [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.25, 0.25, 0.5], [0.2, 0.6, 0.2]], [1, 0, 2, 1], [0]),
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
    assert SupervisedLoss(alpha=0.5)(za, target, zb).item() == pytest.approx(ce_ + dice + 0.5 * corr.item())


def cps_by_hand(student, teacher, keep_ratio, t, kl_weighting, rule="certain"):
    n = len(student)
    h = [ent(p) if rule == "certain" else -ent(p) for p in teacher]
    kth = sorted(h)[math.ceil(keep_ratio * n) - 1]
    kept = [v for v in range(n) if h[v] <= kth]
    total = 0.0
    for v in range(n):
        d = kl(tempered(teacher[v], t), tempered(student[v], t)) if kl_weighting else 0.0
        w = math.exp(-d)
        if v in kept:
            total += n / len(kept) * w * ce(student[v], argmax(teacher[v]))
        total += d
    return total / n, kept


@pytest.mark.parametrize("pa, pb", [(PA2, PB2), (PA3, PB3)])
@pytest.mark.parametrize("keep_ratio, t, kl_weighting", [(0.6, 1.0, True), (0.6, 2.0, True), (1.0, 0.5, True), (0.4, 1.0, False)])
def test_cross_consistency_by_hand(pa, pb, keep_ratio, t, kl_weighting):
    expected = cps_by_hand(pa, pb, keep_ratio, t, kl_weighting)[0] + cps_by_hand(pb, pa, keep_ratio, t, kl_weighting)[0]
    loss = CrossConsistencyLoss(keep_ratio=keep_ratio, temperature=t, kl_weighting=kl_weighting)
    assert loss(logits_of(pa), logits_of(pb)).item() == pytest.approx(expected, rel=1e-6)


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


def test_kl_weight_detach_switch():
    za = logits_of(PA2).requires_grad_()
    zb = logits_of(PB2)
    grads = []
    for detach in (False, True):
        za.grad = None
        CrossConsistencyLoss(detach_weight=detach).one_way(za, zb).mean().backward()
        grads.append(za.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


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


@pytest.mark.parametrize("pa, pb, keep_ratio", [(PA2, PB2, 0.6), (PA3, PB3, 1.0)])
def test_prototype_by_hand(pa, pb, keep_ratio):
    feats = [[1.0, 0.5], [-0.3, 1.0], [0.2, -0.8], [0.7, 0.7], [-1.0, 0.1]]
    mean = [[(a + b) / 2 for a, b in zip(p, q)] for p, q in zip(pa, pb)]
    pseudo = [argmax(p) for p in mean]
    h = [ent(p) for p in mean]
    kth = sorted(h)[math.ceil(keep_ratio * 5) - 1]
    reliable = [v for v in range(5) if h[v] <= kth and argmax(pa[v]) == pseudo[v] == argmax(pb[v])]
    expected = prototype_by_hand(feats, pseudo, reliable, 0.1)
    f = torch.tensor(feats, dtype=torch.float64).t().unsqueeze(0).requires_grad_()
    loss = PrototypeContrastiveLoss(temperature=0.1, keep_ratio=keep_ratio, sample_ratio=1.0, min_samples=1)
    value = loss(f, logits_of(pa), logits_of(pb))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    reliable_grad = f.grad[0, :, reliable].abs().sum()
    assert f.grad.abs().sum() > 0 and reliable_grad == 0  # prototypes are detached


def test_prototype_sampling_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, 16)
    feats = torch.randn(2, 8, 16, 16, 16)
    loss = PrototypeContrastiveLoss(keep_ratio=0.5, sample_ratio=0.01, min_samples=10, max_samples=100, reduction="none")
    per_sample = loss(feats, logits)
    assert per_sample.shape == (100,)
    assert int((per_sample > 0).sum()) == 41  # ceil(0.01 * 4096 uncertain voxels)


def test_cosine_by_hand():
    za, zb = logits_of(PA3), logits_of(PB3)
    cos = [sum(a * b for a, b in zip(p, q)) / math.hypot(*p) / math.hypot(*q) for p, q in zip(PA3, PB3)]
    assert CosineConsistencyLoss()(za, zb).item() == pytest.approx(sum(1 - c for c in cos) / 5)
    assert CosineConsistencyLoss(reduction="none")(za, zb).shape == (1, 1, 5)


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
    ],
)
def test_bad_input_raises(call, expected):
    with pytest.raises(ValueError, match=expected):
        call()


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
