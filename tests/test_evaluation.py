"""Evaluation: metrics against brute force and MONAI, LCC, the sliding-window protocols, evaluate.yaml end to end."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigWorkflow
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from monai.transforms.utils import has_measure
from scipy import ndimage

from conftest import CONFIGS, tiny_overrides
from monai_dualssl import evaluation
from monai_dualssl import (
    DualNet,
    binary_metrics,
    fast_inferer,
    field_inferer,
    field_overlap,
    keep_largest_component,
    load_weights,
    model_variants,
    protocol_inferer,
    segmentation_metrics,
    summarize,
    surface_distances,
)

SPACING = (0.7, 1.3, 2.1)  # anisotropic on purpose


def blob(seed, shape=(12, 10, 8), threshold=0.2):
    """A random smooth binary blob (may touch the array border)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return field > threshold * field.std()


def brute_surface(mask):
    """Voxels of ``mask`` with a face neighbour outside the mask or outside the array."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in mask.shape)
    surface = np.zeros_like(mask)
    for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
        surface |= mask & ~np.roll(padded, step, axis=axis)[inner]
    return surface


def brute_distances(a, b, spacing):
    """For every surface voxel of ``a``, the Euclidean distance to the nearest surface voxel of ``b``."""
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def brute_metrics(pred, gt, spacing):
    inter = np.logical_and(pred, gt).sum()
    out = {"dice": 2 * inter / (pred.sum() + gt.sum()), "jaccard": inter / np.logical_or(pred, gt).sum()}
    for unit, sp in (("vox", (1, 1, 1)), ("mm", spacing)):
        d_pg, d_gp = brute_distances(pred, gt, sp), brute_distances(gt, pred, sp)
        out[f"hd95_{unit}"] = np.percentile(np.concatenate([d_pg, d_gp]), 95)
        out[f"asd_{unit}"] = d_pg.mean()
    out["assd_mm"] = np.concatenate([d_pg, d_gp]).mean()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metrics_match_brute_force(seed):
    pred, gt = blob(2 * seed), blob(2 * seed + 1)
    assert pred.any() and gt.any() and (pred ^ gt).any()
    ours = binary_metrics(pred, gt, SPACING)
    expected = brute_metrics(pred, gt, SPACING)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert not ours["empty_pred"] and not ours["empty_gt"]


def test_metrics_agree_with_monai():
    pred, gt = blob(10), blob(11)
    to_gt, to_pred = surface_distances(pred, gt, SPACING)
    ours = binary_metrics(pred, gt, SPACING)
    onehot = lambda m: torch.from_numpy(np.stack([~m, m]))[None].float()  # noqa: E731
    yp, y = onehot(pred), onehot(gt)
    assert compute_dice(yp, y, include_background=False).item() == pytest.approx(ours["dice"], rel=1e-6)
    # MONAI's edges (get_mask_edges without subvoxels) are the same erosion-based surface, so the
    # symmetric ASD (mean of the pooled distances) and the directed Hausdorff distance coincide.
    assd = compute_average_surface_distance(yp, y, symmetric=True, spacing=SPACING).item()
    assert assd == pytest.approx(ours["assd_mm"], rel=1e-5)
    asd = compute_average_surface_distance(yp, y, symmetric=False, spacing=SPACING).item()
    assert asd == pytest.approx(ours["asd_mm"], rel=1e-5)  # medpy's asd is MONAI's directed ASD
    hd = compute_hausdorff_distance(yp, y, directed=True, spacing=SPACING).item()
    assert hd == pytest.approx(to_gt.max(), rel=1e-5)
    hd95_directed = compute_hausdorff_distance(yp, y, directed=True, percentile=95, spacing=SPACING).item()
    assert hd95_directed == pytest.approx(np.percentile(to_gt, 95), rel=1e-5)
    # Where the definitions differ: MONAI's symmetric HD95 is the larger of the two directed 95th
    # percentiles, medpy's hd95 (ours) the 95th percentile of the pooled distances.
    hd95_sym = compute_hausdorff_distance(yp, y, percentile=95, spacing=SPACING).item()
    assert hd95_sym == pytest.approx(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)), rel=1e-5)
    assert ours["hd95_mm"] == pytest.approx(np.percentile(np.concatenate([to_gt, to_pred]), 95))


def test_empty_prediction_is_reported_not_scored_zero():
    gt = blob(5)
    empty = np.zeros_like(gt)
    m = binary_metrics(empty, gt, SPACING)
    assert m["empty_pred"] and not m["empty_gt"] and m["dice"] == 0 and m["jaccard"] == 0
    assert all(math.isnan(m[k]) for k in ("hd95_vox", "asd_vox", "hd95_mm", "asd_mm", "assd_mm"))
    both = binary_metrics(empty, empty)
    assert both["empty_pred"] and both["empty_gt"] and both["dice"] == 1 and both["jaccard"] == 1
    assert math.isnan(both["hd95_vox"])
    rows = [
        {"model": "ensemble", "postprocessing": "none", **r}
        for r in segmentation_metrics(empty.astype(int), gt.astype(int), 2, SPACING)
        + segmentation_metrics(gt.astype(int), gt.astype(int), 2, SPACING)
    ]
    s = summarize(rows)["ensemble"]["none"]["1"]
    assert s["n_cases"] == 2 and s["n_empty_pred"] == 1
    assert s["dice"]["mean"] == pytest.approx(0.5) and s["dice"]["n"] == 2
    assert s["hd95_mm"] == {"mean": 0.0, "std": 0.0, "n": 1}  # the empty case is left out, not counted as 0


def test_multiclass_metrics_per_foreground_class():
    gt = blob(1).astype(int) + 2 * (blob(2) & ~blob(1))
    rows = segmentation_metrics(gt, gt, 3, SPACING)
    assert [r["class"] for r in rows] == [1, 2] and all(r["dice"] == 1 and r["hd95_mm"] == 0 for r in rows)


def test_lcc_keeps_only_the_largest_component():
    labels = np.zeros((12, 12, 12), dtype=np.int64)
    labels[1:4, 1:4, 1:4] = 1          # 27 voxels
    labels[4, 4, 4] = 1                # touches the big one at a corner: same component (full connectivity)
    labels[8:10, 8:10, 8:10] = 1       # 8 voxels, separate
    labels[0:2, 9:12, 0:2] = 2         # 12 voxels
    labels[10, 0, 10] = 2              # 1 voxel
    out = keep_largest_component(labels, num_classes=3)
    assert (out[1:4, 1:4, 1:4] == 1).all() and out[4, 4, 4] == 1
    assert (out[8:10, 8:10, 8:10] == 0).all() and out[10, 0, 10] == 0
    assert (out[0:2, 9:12, 0:2] == 2).all()
    assert (out == 1).sum() == 28 and (out == 2).sum() == 12


@pytest.mark.skipif(not has_measure, reason="MONAI's connected components need scikit-image")
def test_lcc_fallback_matches_monai(monkeypatch):
    labels = blob(7, shape=(16, 14, 12), threshold=0.8).astype(np.int64)
    with_monai = keep_largest_component(labels, 2)
    monkeypatch.setattr(evaluation, "has_measure", False)
    assert np.array_equal(keep_largest_component(labels, 2), with_monai)


def field_starts(size, patch, stride):
    """UA-MT test_single_case: the volume padded to the patch, then min(stride * i, size - patch)."""
    size = max(size, patch)
    return sorted({min(stride * i, size - patch) for i in range(math.ceil((size - patch) / stride) + 1)})


@pytest.mark.parametrize(
    "size, roi, strides",
    [
        ((183, 140, 88), (112, 112, 80), (18, 18, 4)),
        ((150, 112, 70), (112, 112, 80), (18, 18, 4)),   # one dim equal to, one smaller than the patch
        ((77, 66, 40), (64, 64, 32), (9, 9, 2)),
        ((97, 96, 130), (96, 96, 96), (16, 16, 16)),
        ((20, 30, 10), (32, 32, 16), (16, 16, 8)),        # smaller than the patch everywhere
    ],
)
def test_field_inferer_window_starts(size, roi, strides):
    inferer = field_inferer(roi, strides, with_coord=True)
    seen = []

    def record(x, coords):
        seen.extend(tuple(s.start for s in c[2:]) for c in coords)
        return torch.zeros_like(x)

    out = inferer(torch.zeros(1, 1, *size), record)
    assert out.shape == (1, 1, *size)
    expected = list(itertools.product(*[field_starts(n, r, s) for n, r, s in zip(size, roi, strides)]))
    assert sorted(seen) == sorted(expected)


def test_field_overlap_rejects_bad_strides():
    assert field_overlap((32, 16), (32, 16)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="stride"):
        field_overlap((32, 32, 16), (40, 8, 8))
    with pytest.raises(ValueError, match="protocol"):
        protocol_inferer("medium", (32, 32, 16))


class ConstantSoftmax(nn.Module):
    def forward(self, x):
        p = torch.tensor([0.25, 0.75], dtype=x.dtype).view(1, 2, 1, 1, 1)
        return p.expand(x.shape[0], 2, *x.shape[2:]).clone()


@pytest.mark.parametrize("inferer", [field_inferer((32, 32, 16), (9, 7, 3)), fast_inferer((32, 32, 16))])
def test_inferers_average_probabilities(inferer):
    out = inferer(torch.randn(1, 1, 50, 45, 20), ConstantSoftmax())
    assert out.shape == (1, 2, 50, 45, 20)
    expected = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1, 1).expand_as(out)
    if inferer.mode == "constant":
        assert torch.equal(out, expected)  # plain averaging of identical windows is exact
    else:
        assert torch.allclose(out, expected, atol=1e-6)


def test_field_inferer_pads_symmetrically_and_crops_back():
    x = torch.arange(21 * 40 * 10, dtype=torch.float32).view(1, 1, 21, 40, 10) + 1
    windows = []
    out = field_inferer((32, 32, 16), (16, 16, 8))(x, lambda w: windows.append(w.clone()) or w)
    assert out.shape == x.shape and torch.equal(out, x)
    first = windows[0][0, 0]
    # the field pads (patch - size) // 2 before and the rest after: x by 11 -> 5 + 6, z by 6 -> 3 + 3
    assert torch.equal(first[5:26, :, 3:13], x[0, 0, :, :32])
    assert first[:5].abs().sum() == 0 and first[26:].abs().sum() == 0 and first[..., :3].abs().sum() == 0


def tiny_net():
    return DualNet(n_filters=4, resnet_blocks=(1, 1, 1, 1), vnet_stages=(1, 1, 1, 1, 1), proj_dim=8)


def test_model_variants_and_load_weights(tmp_path):
    torch.manual_seed(0)
    net = tiny_net().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    variants = model_variants(net)
    assert variants["ensemble"] is net
    with torch.no_grad():
        mean = 0.5 * (variants["net_a"](x) + variants["net_b"](x))
        assert torch.allclose(variants["ensemble"](x), mean, atol=1e-6)
        net.output = "logits"
        assert torch.allclose(model_variants(net, ["ensemble"])["ensemble"](x), mean, atol=1e-6)
    with pytest.raises(ValueError, match="unknown model"):
        model_variants(net, ["net_c"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_weights(net, tmp_path / "missing.pt")
    full = {"network_a": net.net_a.state_dict(), "network_b": net.net_b.state_dict(), "optimizer_a": {}}
    torch.save(full, tmp_path / "best.pt")
    other = load_weights(tiny_net(), tmp_path / "best.pt")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), net.state_dict().values()))


@pytest.mark.parametrize("inferer", [field_inferer((16, 16, 16), (5, 6, 7)), fast_inferer((16, 16, 16))])
def test_ensemble_from_both_networks_equals_windowed_ensemble(inferer):
    torch.manual_seed(0)
    net = tiny_net().eval()
    image = torch.randn(1, 1, 21, 19, 18)
    device = torch.device("cpu")
    derived = evaluation._predict_all(model_variants(net), inferer, image, device, False)
    alone = evaluation._predict_all(model_variants(net, ["ensemble"]), inferer, image, device, False)
    with torch.no_grad():
        windowed = inferer(image, net)
        p_a, p_b = (inferer(image, model_variants(net, [n])[n]) for n in ("net_a", "net_b"))
    assert torch.allclose(windowed, (p_a + p_b) / 2, atol=1e-6)  # linearity of window averaging
    assert np.array_equal(derived["ensemble"][0], alone["ensemble"][0])
    assert np.array_equal(derived["net_a"][0], p_a.argmax(1)[0].numpy())
    assert derived["ensemble"][2] == pytest.approx(derived["net_a"][2] + derived["net_b"][2])


def run_evaluate(tmp_path, dataset, **extra):
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=None,
        run_id="evaluating",
        **tiny_overrides(dataset, tmp_path, **extra),
    )
    wf.initialize()
    wf.run()
    return wf


@pytest.mark.parametrize("protocol", ["field", "fast"])
def test_evaluate_yaml_end_to_end(tmp_path, tiny_dataset, protocol):
    torch.manual_seed(0)
    net = tiny_net()
    with torch.no_grad():  # both networks predict foreground everywhere: non-empty masks, finite distances
        for sub in (net.net_a, net.net_b):
            sub.out_conv.weight.zero_()
            sub.out_conv.bias.copy_(torch.tensor([0.0, 1.0]))
    (tmp_path / "models").mkdir()
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(half, tmp_path / "models" / "model.pt")  # half precision: cast back on load
    eval_dir = tmp_path / "eval"
    wf = run_evaluate(tmp_path, tiny_dataset, protocol=protocol, eval_dir=str(eval_dir))

    loaded = wf.parser.get_parsed_content("network_def").state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, half[k].float())
               for k, v in loaded.items() if v.is_floating_point())
    resolved = wf.parser.ref_resolver.resolved_content
    assert "train#trainer" not in resolved and "train#unlabeled_dataset" not in resolved  # no training
    wf.finalize()

    with open(eval_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 2
    assert {(r["model"], r["postprocessing"]) for r in rows} == set(
        itertools.product(["ensemble", "net_a", "net_b"], ["none", "lcc"]))
    assert len({r["case"] for r in rows}) == 2 and {r["class"] for r in rows} == {"1"}
    assert all(0 < float(r["dice"]) < 1 and r["empty_pred"] == "False" and float(r["hd95_mm"]) > 0 for r in rows)
    summary = json.loads((eval_dir / "summary.json").read_text())
    for key in ("protocol", "inferer", "num_cases", "models", "space", "empty_cases", "seconds_per_volume", "metrics"):
        assert key in summary, key
    assert summary["protocol"] == protocol and summary["num_cases"] == 2
    assert summary["inferer"]["mode"] == ("constant" if protocol == "field" else "gaussian")
    if protocol == "field":
        assert summary["inferer"]["scan_interval"] == [16, 16, 8]  # half the 32x32x16 patch by default
    entry = summary["metrics"]["ensemble"]["lcc"]["1"]
    assert entry["n_cases"] == 2 and entry["n_empty_pred"] == 0 and entry["hd95_mm"]["n"] == 2
    assert {"dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm", "assd_mm"} <= set(entry)
    assert set(summary["seconds_per_volume"]) == {"ensemble", "net_a", "net_b"}
    assert (eval_dir / "summary.md").read_text().count("| ensemble |") == 2


def test_disagreement_score_by_hand():
    d = torch.arange(7.0).pow(2).view(1, 1, 7, 1, 1)  # D = 0, 1, 4, ..., 36
    fg = torch.zeros(1, 1, 7, 1, 1)
    fg[0, 0, 3] = 0.9  # predicted foreground at voxel 3 only
    u = torch.cat([1 - fg, fg, torch.zeros_like(d), d], dim=1)  # p (2 classes), entropy, disagreement
    assert evaluation.disagreement_score(u, margin=0) == pytest.approx(9.0)
    assert evaluation.disagreement_score(u, margin=1) == pytest.approx((4 + 9 + 16) / 3)
    assert evaluation.disagreement_score(u, margin=5) == pytest.approx(91 / 7)  # the whole line
    none = torch.cat([torch.ones_like(d), torch.zeros_like(d), torch.zeros_like(d), d], dim=1)
    assert evaluation.disagreement_score(none, margin=1) == pytest.approx(91 / 7)  # nothing predicted: all voxels
    with pytest.raises(ValueError, match=r"\[1, C \+ 2"):
        evaluation.disagreement_score(u[:, :3])
    with pytest.raises(ValueError, match="found"):
        evaluation.disagreement_score(torch.cat([u, u]))
