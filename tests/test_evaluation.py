"""Evaluation: metrics against brute force and MONAI, LCC, the sliding-window protocols, evaluate.yaml end to end."""

import csv
import functools
import itertools
import json
import math
import pickle
import time

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader, Dataset, MetaTensor
from monai.inferers import SimpleInferer
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from monai.transforms.utils import has_measure

from conftest import CONFIGS, blob, blob_image, save_on_gpu, tiny_dualnet, tiny_overrides
from monai_dualssl import evaluation, inference, metrics
from monai_dualssl import (
    METRIC_KEYS,
    MODEL_NAMES,
    binary_metrics,
    class_mean_rows,
    evaluate,
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
    for unit, sp in (("vox", (1,) * pred.ndim), ("mm", spacing)):
        d_pg, d_gp = brute_distances(pred, gt, sp), brute_distances(gt, pred, sp)
        out[f"hd95_{unit}"] = np.percentile(np.concatenate([d_pg, d_gp]), 95)
        out[f"asd_{unit}"] = d_pg.mean()
    out["assd_mm"] = np.concatenate([d_pg, d_gp]).mean()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metrics_match_brute_force(seed):
    pred, gt = blob(seed=2 * seed), blob(seed=2 * seed + 1)
    assert pred.any() and gt.any() and (pred ^ gt).any()
    ours = binary_metrics(pred, gt, SPACING)
    expected = brute_metrics(pred, gt, SPACING)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert not ours["empty_pred"] and not ours["empty_gt"]


def test_metrics_agree_with_monai():
    pred, gt = blob(seed=10), blob(seed=11)
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
    gt = blob(seed=5)
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


def metric_row(case, cls, model="ensemble", dice=1.0, distance=1.0, empty_pred=False, empty_gt=False):
    row = {"case": case, "model": model, "postprocessing": "none", "class": cls, "empty_pred": empty_pred,
           "empty_gt": empty_gt}
    return {**row, **{k: dice if k in ("dice", "jaccard") else distance for k in METRIC_KEYS}}


def test_class_mean_rows_average_the_classes_of_each_case_and_model():
    rows = [
        metric_row("c0", 1, dice=0.9),                                  # one class: no mean row
        metric_row("c1", 1, dice=0.8, distance=2.0), metric_row("c1", 2, dice=0.6, distance=4.0, empty_gt=True),
        metric_row("c1", 1, model="net_a", dice=0.5, distance=1.0),
        metric_row("c1", 2, model="net_a", dice=0.1, distance=float("nan"), empty_pred=True),
        metric_row("c1", "mean", dice=0.0),                             # an existing mean row is not averaged in
        {k: v for k, v in metric_row("c3", 1).items() if k != "case"},  # no case key
        {k: v for k, v in metric_row("c3", 2).items() if k != "case"},
    ]
    out = class_mean_rows(rows)
    common = {"case": "c1", "postprocessing": "none", "class": "mean"}
    assert out[0] == {**common, "model": "ensemble", "empty_pred": False, "empty_gt": True,
                      **{k: pytest.approx(0.7 if k in ("dice", "jaccard") else 3.0) for k in METRIC_KEYS}}
    net_a = out[1]
    assert {k: net_a[k] for k in ("model", "empty_pred", "empty_gt")} == {"model": "net_a", "empty_pred": True,
                                                                          "empty_gt": False}
    assert net_a["dice"] == pytest.approx(0.3) and all(math.isnan(net_a[k]) for k in METRIC_KEYS[2:])
    assert len(out) == 2


def test_multiclass_metrics_per_foreground_class():
    gt = blob(seed=1).astype(int) + 2 * (blob(seed=2) & ~blob(seed=1))
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
    labels = blob((16, 14, 12), seed=7, threshold=0.8).astype(np.int64)
    with_monai = keep_largest_component(labels, 2)
    monkeypatch.setattr(metrics, "has_measure", False)
    assert np.array_equal(keep_largest_component(labels, 2), with_monai)


@pytest.mark.parametrize("scikit_image", [True, False] if has_measure else [False])
def test_lcc_by_hand(monkeypatch, scikit_image):
    """Per class, with MONAI's labelling and with the scipy fallback: full (26-) connectivity, one voxel of two
    single-voxel components kept, a class of one component untouched; without ``num_classes`` every class
    present is processed."""
    monkeypatch.setattr(metrics, "has_measure", scikit_image)
    labels = np.zeros((12, 12, 12), dtype=np.int64)
    labels[1:4, 1:4, 1:4] = 1          # 27 voxels
    labels[4, 4, 4] = 1                # touches the big one at a corner only
    labels[8:10, 8:10, 8:10] = 1       # 8 voxels, separate
    labels[0, 11, 0] = labels[0, 11, 5] = 2  # two single voxels
    labels[6:8, 0:2, 9:11] = 3         # one component
    for num_classes in (4, None):
        out = keep_largest_component(labels, num_classes)
        assert (out[1:4, 1:4, 1:4] == 1).all() and out[4, 4, 4] == 1 and (out == 1).sum() == 28
        assert (out == 2).sum() == 1 and out[0, 11, 0] + out[0, 11, 5] == 2
        assert (out == 3).sum() == 8 and out.dtype == labels.dtype


def test_metric_inputs_are_masks():
    """Any nonzero value is foreground (0/255 masks score as 0/1 masks), equal-sized masks are not Dice 1, and
    the shape and emptiness checks say what is wrong."""
    pred, gt = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
    pred[1:4, 1:4, 1:4], gt[2:5, 1:4, 1:4] = True, True  # the same size, shifted by one voxel
    m = binary_metrics(pred, gt, SPACING)
    assert m["dice"] == pytest.approx(2 * 18 / 54) and m["jaccard"] == pytest.approx(18 / 36)
    assert binary_metrics(pred.astype(np.uint8) * 255, gt.astype(np.uint8) * 255, SPACING) == m
    assert np.array_equal(metrics.surface_voxels(pred.astype(np.uint8) * 255), metrics.surface_voxels(pred))
    for call in (binary_metrics, surface_distances):
        with pytest.raises(ValueError) as error:
            call(pred, gt[:5])
        assert str(error.value) == "pred and gt must have the same shape, found (6, 6, 6) and (5, 6, 6)."
    for a, b in ((pred, np.zeros_like(gt)), (np.zeros_like(pred), gt)):
        with pytest.raises(ValueError) as error:
            surface_distances(a, b)
        assert str(error.value) == "surface distances need two non-empty masks."


def test_model_variants_errors():
    net = tiny_dualnet(output="uncertainty")
    with pytest.raises(ValueError) as error:
        model_variants(net, ["ensemble"])
    assert str(error.value) == "the ensemble must return probabilities; set output='prob' (found output='uncertainty')."
    with pytest.raises(ValueError) as error:  # a single network has no net_a
        model_variants(nn.Conv3d(1, 2, 1), ["net_a"])
    assert str(error.value) == ("unknown model 'net_a' for Conv3d; expected some of "
                                "('ensemble', 'net_a', 'net_b').")
    assert set(model_variants(net, ["net_a", "net_b"])) == {"net_a", "net_b"}  # the networks need no ensemble mode


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
    assert field_overlap((16, 16), (1, 16)) == (1.0 - 1.5 / 16, 0.0)  # a stride of one voxel is valid
    with pytest.raises(ValueError, match="stride"):
        field_overlap((32, 32, 16), (40, 8, 8))
    with pytest.raises(ValueError, match="stride"):
        field_overlap((32, 32, 16), (0, 8, 8))
    with pytest.raises(ValueError) as error:
        field_overlap((32, 32, 16), (8, 8))
    assert str(error.value) == "roi_size (32, 32, 16) and strides (8, 8) must have the same length."
    with pytest.raises(ValueError, match="protocol"):
        protocol_inferer("medium", (32, 32, 16))
    with pytest.raises(ValueError) as error:
        protocol_inferer("field", (32, 32, 16))
    assert str(error.value) == "the field protocol needs strides (sw_strides)."


def windows_and_calls(inferer, size):
    """``(windows, forward calls)`` of ``inferer`` over a one-channel volume of ``size``."""
    calls = []

    def net(x, *coords):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    inferer(torch.zeros(1, 1, *size), net)
    return sum(calls), len(calls)


@pytest.mark.parametrize(
    "make, windows, calls",
    [
        (lambda: fast_inferer((16, 16, 16)), 64, 16),  # 50 % overlap: windows every 8 voxels, 4 a pass
        (lambda: fast_inferer((16, 16, 16), overlap=0.25, sw_batch_size=2), 27, 14),  # every 12 voxels
        (lambda: protocol_inferer("fast", (16, 16, 16)), 64, 16),
        (lambda: protocol_inferer("fast", (16, 16, 16), overlap=0.25, sw_batch_size=5), 27, 6),
        (lambda: field_inferer((16, 16, 16), (12, 12, 12)), 27, 27),  # one window a pass, as the field
        (lambda: field_inferer((16, 16, 16), (12, 12, 12), sw_batch_size=3), 27, 9),
        (lambda: protocol_inferer("field", (16, 16, 16), strides=(8, 12, 16), sw_batch_size=8), 4 * 3 * 3, 36),
    ],
)
def test_inferer_settings_by_counting_windows(make, windows, calls):
    """On a 40^3 volume with 16^3 windows: the overlap sets the windows, the batch size the forward passes."""
    assert windows_and_calls(make(), (40, 40, 40)) == (windows, calls)


def test_inferers_pass_extra_arguments_on():
    for inferer in (fast_inferer((16, 16, 16), with_coord=True), field_inferer((16, 16, 16), (8, 8, 8), with_coord=True)):
        seen = []
        inferer(torch.zeros(1, 1, 20, 20, 20), lambda x, coords: seen.append(coords) or torch.zeros_like(x))
        assert seen


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


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"filename_or_obj": "/data/case_a/image.nii.gz"}, "case_a/image.nii.gz"),
        ({"filename_or_obj": ["/data/case_b/label.nii.gz", "/data/other/x.nii.gz"]}, "case_b/label.nii.gz"),
        ({"filename_or_obj": []}, "case_007"),
        ({"filename_or_obj": ""}, "case_007"),
        ({"filename_or_obj": 5}, "case_007"),
        ({}, "case_007"),
        (None, "case_007"),  # a plain tensor: no metadata at all
    ],
)
def test_case_names(meta, expected):
    image = torch.zeros(1, 1, 2, 2, 2) if meta is None else MetaTensor(torch.zeros(1, 1, 2, 2, 2), meta=meta)
    assert evaluation._case_name(image, 7) == expected


def test_load_weights_checks_what_it_loads(tmp_path):
    net = tiny_dualnet()
    state = net.state_dict()
    torch.save({"network_a": net.net_a.state_dict(), "network_b": net.net_b.state_dict()}, tmp_path / "two.pt")
    loaded = load_weights(tiny_dualnet(seed=1), tmp_path / "two.pt")  # exactly the two networks: a checkpoint too
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), state.values()))
    partial = {k: v for k, v in state.items() if k.startswith("net_a.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError) as error:  # strict by default: missing keys are an error
        load_weights(tiny_dualnet(), tmp_path / "partial.pt")
    assert str(error.value).startswith(f"{tmp_path / 'partial.pt'} does not fit DualNet: Error(s) in loading state_dict")
    other = load_weights(tiny_dualnet(seed=1), tmp_path / "partial.pt", strict=False)
    assert torch.equal(other.net_a.out_conv.weight, net.net_a.out_conv.weight)
    assert not torch.equal(other.net_b.out_conv.weight, net.net_b.out_conv.weight)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError) as error:
        load_weights(tiny_dualnet(), tmp_path / "tensor.pt")
    assert str(error.value) == f"{tmp_path / 'tensor.pt'}: expected a state_dict, found Tensor."
    torch.save({"net_a.x": CodeNet([0.5])}, tmp_path / "pickled.pt")  # arbitrary objects are not unpickled
    with pytest.raises(pickle.UnpicklingError):
        load_weights(tiny_dualnet(), tmp_path / "pickled.pt")


def test_load_weights_reads_a_checkpoint_saved_on_a_gpu_on_a_cpu(tmp_path):
    net = tiny_dualnet()
    save_on_gpu(net.state_dict(), tmp_path / "gpu.pt")
    loaded = load_weights(tiny_dualnet(seed=1), tmp_path / "gpu.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_disagreement_score_default_margin_and_1d():
    d = torch.arange(11.0).pow(2).view(1, 1, 11)  # D = 0, 1, 4, ..., 100 on a 1-D line
    fg = torch.zeros(1, 1, 11)
    fg[0, 0, 5] = 0.9
    u = torch.cat([1 - fg, fg, torch.zeros_like(d), d], dim=1)
    assert inference.disagreement_score(u) == pytest.approx(sum(v * v for v in range(2, 9)) / 7)  # margin 3
    assert inference.uncertainty_score(u) == pytest.approx(sum(v * v for v in range(2, 9)) / 7)  # the same defaults
    assert inference.disagreement_score(u, margin=4) == pytest.approx(sum(v * v for v in range(1, 10)) / 9)


def test_model_variants_and_load_weights(tmp_path):
    net = tiny_dualnet().eval()
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
    other = load_weights(tiny_dualnet(seed=1), tmp_path / "best.pt")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), net.state_dict().values()))


@pytest.mark.parametrize("inferer", [field_inferer((16, 16, 16), (5, 6, 7)), fast_inferer((16, 16, 16))])
def test_ensemble_from_both_networks_equals_windowed_ensemble(inferer):
    net = tiny_dualnet().eval()
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


ANISOTROPIC = np.diag([0.75, 1.25, 2.0, 1.0])  # voxel size of the end-to-end test's NIfTI files (exact in float32)


@pytest.fixture(scope="module")
def anisotropic_dataset(tmp_path_factory):
    """An MSD folder of 3 NIfTI cases (a bright ball in noise, its mask as label) with 0.75 x 1.25 x 2 mm
    voxels; the last two validate."""
    root = tmp_path_factory.mktemp("anisotropic")
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir()
    items = []
    for i, shape in enumerate([(32, 32, 16), (28, 30, 18), (34, 26, 14)]):
        image, mask = blob_image(shape, seed=i)
        nib.save(nib.Nifti1Image(image, ANISOTROPIC), root / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), ANISOTROPIC), root / "labelsTr" / f"c{i}.nii.gz")
        items.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": items[:1], "validation": items[1:]}))
    return root


@pytest.mark.parametrize("protocol", ["field", "fast"])
def test_evaluate_yaml_end_to_end(tmp_path, anisotropic_dataset, protocol):
    net = tiny_dualnet()
    with torch.no_grad():  # A: foreground everywhere (p = 0.73); B: background everywhere (p_fg = 0.38)
        for sub, bias in ((net.net_a, [0.0, 1.0]), (net.net_b, [0.0, -0.5])):
            sub.out_conv.weight.zero_()
            sub.out_conv.bias.copy_(torch.tensor(bias))
    (tmp_path / "models").mkdir()
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(half, tmp_path / "models" / "model.pt")  # half precision: cast back on load
    eval_dir = tmp_path / "eval"
    wf = run_evaluate(tmp_path, anisotropic_dataset, protocol=protocol, eval_dir=str(eval_dir))

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
    assert {r["case"] for r in rows} == {"imagesTr/c1.nii.gz", "imagesTr/c2.nii.gz"}
    assert {r["class"] for r in rows} == {"1"} and {r["spacing"] for r in rows} == {"0.75 1.25 2"}
    # the ensemble (mean p_fg 0.55) and A predict the whole volume, B nothing: metrics by brute force
    # on the label files, with the files' voxel size for the millimetres
    for i in (1, 2):
        gt = np.asarray(nib.load(anisotropic_dataset / "labelsTr" / f"c{i}.nii.gz").dataobj).astype(bool)
        expected = brute_metrics(np.ones_like(gt), gt, (0.75, 1.25, 2.0))
        case_rows = [r for r in rows if r["case"].endswith(f"c{i}.nii.gz")]
        assert len(case_rows) == 6
        for r in case_rows:
            if r["model"] == "net_b":
                assert r["empty_pred"] == "True" and float(r["dice"]) == 0 and math.isnan(float(r["hd95_mm"]))
                continue
            assert r["empty_pred"] == "False"
            for key, value in expected.items():
                assert float(r[key]) == pytest.approx(value, rel=1e-6), (r["model"], key)
    summary = json.loads((eval_dir / "summary.json").read_text())
    for key in ("protocol", "inferer", "num_cases", "models", "space", "empty_cases", "seconds_per_volume", "metrics"):
        assert key in summary, key
    assert summary["protocol"] == protocol and summary["num_cases"] == 2
    assert summary["spacings_mm"] == [[0.75, 1.25, 2.0]]
    assert summary["inferer"]["mode"] == ("constant" if protocol == "field" else "gaussian")
    if protocol == "field":
        assert summary["inferer"]["scan_interval"] == [16, 16, 8]  # half the 32x32x16 patch by default
    entry = summary["metrics"]["ensemble"]["lcc"]["1"]
    assert entry["n_cases"] == 2 and entry["n_empty_pred"] == 0 and entry["hd95_mm"]["n"] == 2
    assert {"dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm", "assd_mm"} <= set(entry)
    empty = summary["metrics"]["net_b"]["none"]["1"]
    assert empty["n_empty_pred"] == 2 and empty["hd95_mm"] == {"mean": None, "std": None, "n": 0}
    assert empty["dice"] == {"mean": 0.0, "std": 0.0, "n": 2}
    assert set(summary["seconds_per_volume"]) == {"ensemble", "net_a", "net_b"}
    assert (eval_dir / "summary.md").read_text().count("| ensemble |") == 2


class CodeNet(nn.Module):
    """A "network" whose foreground probability at a voxel is ``p_fg[code]``, the code being the image value."""

    def __init__(self, p_fg):
        super().__init__()
        self.register_buffer("logit", torch.tensor([math.log(p / (1 - p)) for p in p_fg]))

    def forward(self, x):
        z = self.logit[x.round().long().clamp(0, len(self.logit) - 1)]
        return torch.cat([torch.zeros_like(z), z], dim=1)


class CodeDualNet(nn.Module):
    """Two networks that disagree: A says foreground (0.55) on codes 1 and 3, B on codes 2 and 3, each says
    background firmly (0.1) elsewhere; their mean is foreground on code 3 only. ``forward``: the mean softmax
    (``calls`` counts its calls)."""

    def __init__(self):
        super().__init__()
        self.net_a = CodeNet([0.1, 0.55, 0.1, 0.55])
        self.net_b = CodeNet([0.1, 0.1, 0.55, 0.55])
        self.unused = nn.Parameter(torch.zeros(()))  # where the network lives, for evaluate's default device
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return (torch.softmax(self.net_a(x), 1) + torch.softmax(self.net_b(x), 1)) / 2


# array axes of this affine have 0.7, 1.3 and 2.1 mm voxels (axes permuted and flipped in world space)
PERMUTED = np.array([[0.0, 1.3, 0.0, 5.0], [-0.7, 0.0, 0.0, 2.0], [0.0, 0.0, 2.1, -1.0], [0.0, 0.0, 0.0, 1.0]])


def code_case(split):
    """Codes on a 14 x 12 x 10 grid: 1 in x 2..split, 3 in x split..11 (y 2..9, z 2..8), 2 in a slab beside
    them (y 9..11) and 3 in one voxel apart, (12, 11, 9); the label is the codes 1 and 3 but that voxel.
    Returns ``(codes, label, {post-processing: {model: predicted mask}})``: the largest component ("lcc")
    drops the lone voxel."""
    codes = np.zeros((14, 12, 10), np.float32)
    codes[2:split, 2:9, 2:8] = 1
    codes[split:11, 2:9, 2:8] = 3
    codes[2:11, 9:11, 2:8] = 2
    codes[12, 11, 9] = 3
    island = np.zeros(codes.shape, bool)
    island[12, 11, 9] = True
    label = np.isin(codes, (1, 3)) & ~island
    none = {"ensemble": codes == 3, "net_a": np.isin(codes, (1, 3)), "net_b": np.isin(codes, (2, 3))}
    return codes, label, {"none": none, "lcc": {m: mask & ~island for m, mask in none.items()}}


@pytest.mark.parametrize("spacing", [None, (2.0, 0.5, 1.0)])
def test_evaluate_disagreeing_networks_on_anisotropic_voxels(tmp_path, spacing):
    """Each model is scored on its own prediction, the ensemble on the mean of both, distances in mm use the
    voxel size of the image's affine (or ``spacing``), and the summary's std is the population std."""
    splits = {"a": 6, "b": 8}
    items = []
    for name, split in splits.items():
        codes, label, _ = code_case(split)
        meta = {"filename_or_obj": f"/data/{name}/image.nii.gz"}
        items.append({"image": MetaTensor(codes[None], affine=torch.tensor(PERMUTED), meta=meta),
                      "label": MetaTensor(label[None].astype(np.uint8), affine=torch.tensor(PERMUTED))})
    loader = DataLoader(Dataset(items), batch_size=1)
    network = CodeDualNet()
    start = time.perf_counter()
    summary = evaluate(network, loader, field_inferer((8, 8, 8), (4, 4, 4)), tmp_path, device="cpu",
                       spacing=spacing, progress=False)
    elapsed = time.perf_counter() - start
    assert network.calls == 0  # the ensemble is derived from both networks' windows, never run itself
    assert 0 < summary["seconds_per_volume"]["net_a"] < elapsed and 0 < summary["seconds_per_volume"]["net_b"] < elapsed
    mm = (0.7, 1.3, 2.1) if spacing is None else spacing
    with open(tmp_path / "metrics.csv") as f:
        rows = {(r["case"], r["model"], r["postprocessing"]): r for r in csv.DictReader(f)}
    assert len(rows) == 2 * 3 * 2
    # Dice by hand: |R1| = 42 (split - 2), |R3| = 42 (11 - split), |slab| = 9 * 2 * 6 = 108, label R1 + R3 = 378,
    # and without largest-component post-processing every prediction has the lone voxel too
    dice = {
        (name, post): {"ensemble": 2 * 42 * (11 - s) / (42 * (11 - s) + extra + 378),
                       "net_a": 2 * 378 / (378 + extra + 378),
                       "net_b": 2 * 42 * (11 - s) / (108 + 42 * (11 - s) + extra + 378)}
        for name, s in splits.items() for post, extra in (("none", 1), ("lcc", 0))
    }
    for name, split in splits.items():
        _, label, masks = code_case(split)
        for post in ("none", "lcc"):
            for model, mask in masks[post].items():
                r = rows[(f"{name}/image.nii.gz", model, post)]
                assert float(r["dice"]) == pytest.approx(dice[name, post][model]), (name, model, post)
                assert r["spacing"] == " ".join(f"{s:g}" for s in mm)
                expected = brute_metrics(mask, label, mm)
                for key in ("hd95_vox", "asd_vox", "hd95_mm", "asd_mm", "assd_mm"):
                    assert float(r[key]) == pytest.approx(expected[key], rel=1e-9, abs=1e-9), (name, model, key)
        assert float(rows[(f"{name}/image.nii.gz", "net_b", "none")]["hd95_mm"]) != pytest.approx(
            float(rows[(f"{name}/image.nii.gz", "net_b", "none")]["hd95_vox"]))
    entry = summary["metrics"]["ensemble"]["none"]["1"]["dice"]
    d_a, d_b = dice["a", "none"]["ensemble"], dice["b", "none"]["ensemble"]
    assert entry["mean"] == pytest.approx((d_a + d_b) / 2) and entry["std"] == pytest.approx(abs(d_a - d_b) / 2)
    assert summary["spacings_mm"] == [list(mm)]
    # the ensemble alone (the network's own mean softmax) scores the same
    alone = evaluate(CodeDualNet(), loader, field_inferer((8, 8, 8), (4, 4, 4)), tmp_path / "alone",
                     models=["ensemble"], device="cpu", spacing=spacing, progress=False)
    assert alone["metrics"]["ensemble"] == summary["metrics"]["ensemble"]


def test_evaluate_reports(tmp_path):
    """What the evaluation writes besides the numbers: columns, class names, descriptions, the inferer."""
    codes, label, _ = code_case(6)
    item = {"image": MetaTensor(codes[None], meta={"filename_or_obj": "/d/a/image.nii.gz"}), "label": label[None]}
    loader = DataLoader(Dataset([item]), batch_size=1)
    inferer = field_inferer((8, 8, 8), (4, 4, 6))
    out = tmp_path / "nested" / "eval"  # created with its parents
    summary = evaluate(CodeDualNet(), loader, inferer, out, protocol="field", progress=False,  # device: the network's
                       pixdim=[0.5, 0, 0], label_names={"atrium": 1})
    assert summary["protocol"] == "field" and summary["num_cases"] == 1 and summary["models"] == list(MODEL_NAMES)
    assert summary["inferer"] == {"type": "SlidingWindowInferer", "roi_size": [8, 8, 8], "overlap": [0.4375, 0.4375, 0.1875],
                                  "mode": "constant", "sw_batch_size": 1, "scan_interval": [4, 4, 6]}
    assert summary["postprocessing"] == {"none": "argmax", "lcc": "argmax, then the largest connected component per class"}
    assert summary["space"] == ("resampled by the preprocessing to pixdim [0.5, 0, 0] mm; distances in voxels count "
                                "voxels of that grid, distances in mm use its spacing")
    assert summary["std"] == "population standard deviation over cases (ddof=0)"
    assert summary["empty_cases"] == metrics.EMPTY_RULE and summary["metric_definitions"] == metrics.METRIC_NOTES
    assert summary["class_names"] == {"1": "atrium"} and summary["spacings_mm"] == [[1.0, 1.0, 1.0]]
    assert set(summary["seconds_per_volume"]) == set(MODEL_NAMES) and min(summary["seconds_per_volume"].values()) > 0
    assert (out / "summary.json").read_text() == json.dumps(summary, indent=2)
    with open(out / "metrics.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert all(float(r["seconds"]) == summary["seconds_per_volume"][r["model"]] for r in rows)
    assert reader.fieldnames == ["case", "model", "postprocessing", "class", "class_name", "dice", "jaccard", "empty_pred",
                                 "empty_gt", *METRIC_KEYS[2:], "spacing", "seconds"]
    assert {r["class_name"] for r in rows} == {"atrium"} and {r["case"] for r in rows} == {"a/image.nii.gz"}
    md = (out / "summary.md").read_text().splitlines()
    assert md[0] == "# Evaluation (field protocol, 1 cases)" and md[2].startswith("Inferer: `{\"type\": ")
    assert md[2].endswith("`. Space: " + summary["space"] + ".") and sum(line.startswith("| ") for line in md) == 7
    plain = evaluate(CodeDualNet(), loader, inferer, tmp_path / "plain", device="cpu", progress=False)
    assert plain["space"].startswith("the images' own voxel grid; ") and plain["class_names"] == {"1": "class_1"}
    assert plain["protocol"] == "" and evaluate(CodeDualNet(), loader, inferer, tmp_path / "zero", device="cpu",
                                                progress=False, pixdim=[0, 0, 0])["space"] == plain["space"]


class LabelNet(nn.Module):
    """A "network" predicting class ``round(x)`` of ``classes`` firmly (logit 10 for it, 0 for the others)."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return 10.0 * nn.functional.one_hot(x[:, 0].round().long(), self.classes).movedim(-1, 1).float()


class LabelDualNet(CodeDualNet):
    def __init__(self, classes):
        super().__init__()
        self.net_a = self.net_b = LabelNet(classes)


def test_evaluate_reports_the_mean_over_several_foreground_classes(tmp_path):
    label = torch.zeros(1, 12, 12, 12)
    label[0, 2:6, 2:6, 2:6], label[0, 7:10, 7:10, 7:10] = 1, 2
    loader = DataLoader(Dataset([{"image": label.clone(), "label": label}]), batch_size=1)
    summary = evaluate(LabelDualNet(3), loader, field_inferer((8, 8, 8), (4, 4, 4)), tmp_path, models=["ensemble"],
                       device="cpu", progress=False, label_names={"one": 1, "two": 2})
    assert summary["class_mean"] == metrics.CLASS_MEAN_RULE
    assert list(summary["metrics"]["ensemble"]["none"]) == ["1", "2", metrics.CLASS_MEAN]
    assert summary["metrics"]["ensemble"]["none"][metrics.CLASS_MEAN]["dice"] == {"mean": 1.0, "std": 0.0, "n": 1}
    md = (tmp_path / "summary.md").read_text().split("\n")
    assert [line.split(" | ")[2] for line in md if line.startswith("| ensemble | none")] == ["one", "two", "mean of 2"]
    assert md[-4:] == ["Mean ± standard deviation (ddof=0) over cases. " + metrics.EMPTY_RULE, "",
                       "'mean of n' rows: " + metrics.CLASS_MEAN_RULE, ""]
    binary = evaluate(LabelDualNet(2), DataLoader(Dataset([{"image": (label > 0).float(), "label": (label > 0).float()}])),
                      field_inferer((8, 8, 8), (4, 4, 4)), tmp_path / "binary", device="cpu", progress=False)
    assert "class_mean" not in binary and list(binary["metrics"]["ensemble"]["none"]) == ["1"]
    assert not any("mean of" in line for line in (tmp_path / "binary" / "summary.md").read_text().splitlines())


class AutocastProbe(nn.Module):
    """Foreground exactly where it runs under CPU autocast."""

    def forward(self, x):
        fg = 1.0 if torch.is_autocast_enabled("cpu") else -1.0
        return torch.cat([torch.zeros_like(x), torch.full_like(x, fg)], dim=1).float()


def test_evaluate_plain_tensors_2d_and_amp(tmp_path):
    """Plain tensors (no metadata): case_<index> names and 1-voxel spacing; a 2-D case whose MetaTensor is not
    batched; the networks run under autocast exactly when ``amp`` is set."""
    codes, label, _ = code_case(6)
    plain = [{"image": torch.tensor(codes)[None, None], "label": torch.tensor(label)[None, None]}]
    summary = evaluate(CodeDualNet(), plain, field_inferer((8, 8, 8), (4, 4, 4)), tmp_path / "plain", device="cpu",
                       progress=False)
    assert summary["spacings_mm"] == [[1.0, 1.0, 1.0]]
    with open(tmp_path / "plain" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows} == {"case_000"} and all(r["hd95_mm"] == r["hd95_vox"] for r in rows)
    codes2d, label2d = codes[:, :, 4], label[:, :, 4]
    item = {"image": MetaTensor(codes2d[None, None], affine=torch.diag(torch.tensor([0.5, 2.0, 1.0, 1.0]))),
            "label": torch.tensor(label2d)[None, None]}
    summary = evaluate(CodeDualNet(), [item], field_inferer((8, 8), (4, 4)), tmp_path / "2d", device="cpu",
                       progress=False)
    assert summary["spacings_mm"] == [[0.5, 2.0]]
    ensemble = summary["metrics"]["ensemble"]["lcc"]["1"]
    expected = brute_metrics(codes2d == 3, label2d, (0.5, 2.0))
    assert ensemble["dice"]["mean"] == pytest.approx(expected["dice"])
    assert ensemble["hd95_mm"]["mean"] == pytest.approx(expected["hd95_mm"])
    probe = nn.Module()
    probe.net_a, probe.net_b = AutocastProbe(), AutocastProbe()
    for amp, dice in ((None, 0.0), (False, 0.0), (True, 2 * 378 / (14 * 12 * 10 + 378))):  # None: the default
        result = evaluate(probe, plain, field_inferer((8, 8, 8), (4, 4, 4)), tmp_path / f"amp{amp}", device="cpu",
                          models=["net_a", "net_b"], progress=False, **({} if amp is None else {"amp": amp}))
        assert result["models"] == ["net_a", "net_b"]
        assert result["metrics"]["net_a"]["none"]["1"]["dice"]["mean"] == pytest.approx(dice)


def test_evaluate_progress_bar(tmp_path, capsys):
    codes, label, _ = code_case(6)
    plain = [{"image": torch.tensor(codes)[None, None], "label": torch.tensor(label)[None, None]}]
    run = functools.partial(evaluate, CodeDualNet(), plain, field_inferer((8, 8, 8), (4, 4, 4)), tmp_path, device="cpu")
    run(protocol="field")  # a progress bar by default, named by the protocol
    assert "evaluating (field): 100%" in capsys.readouterr().err
    run()
    assert "evaluating (inferer): 100%" in capsys.readouterr().err
    run(progress=False)
    assert "evaluating" not in capsys.readouterr().err


def test_describe_inferers():
    assert evaluation._describe(SimpleInferer()) == {
        "type": "SimpleInferer", "roi_size": None, "overlap": None, "mode": "None", "sw_batch_size": None}
    desc = evaluation._describe(field_inferer((8, 8, 8), (1, 4, 8)))
    assert desc["scan_interval"] == [1, 4, 8] and desc["mode"] == "constant" and type(desc["mode"]) is str


def test_evaluate_rejects_bad_batches(tmp_path):
    codes, label, _ = code_case(6)
    run = functools.partial(evaluate, CodeDualNet(), inferer=field_inferer((8, 8, 8), (4, 4, 4)), output_dir=tmp_path,
                            device="cpu", progress=False)
    two = [{"image": torch.tensor(np.stack([codes, codes]))[:, None], "label": torch.tensor(np.stack([label, label]))[:, None]}]
    with pytest.raises(ValueError) as error:
        run(dataloader=two)
    assert str(error.value) == "expected batches of one case, found a batch of 2 (use batch_size=1)."
    cropped = [{"image": torch.tensor(codes)[None, None], "label": torch.tensor(label[:, :, :9])[None, None]}]
    with pytest.raises(ValueError) as error:
        run(dataloader=cropped)
    assert str(error.value) == "case 'case_000': label shape (14, 12, 9) differs from image shape (14, 12, 10)."
    with pytest.raises(ValueError) as error:
        run(dataloader=[])
    assert str(error.value) == "the data loader yielded no case to evaluate."


def test_summary_markdown_by_hand():
    stat = {"mean": 0.8125, "std": 0.0625, "n": 2}
    entry = {"n_cases": 2, "n_empty_pred": 1, "dice": stat, "jaccard": stat, "hd95_vox": {"mean": None, "std": None, "n": 0},
             "asd_vox": {"mean": 1.5, "std": 0.25, "n": 2}, "hd95_mm": stat, "asd_mm": stat, "assd_mm": stat}
    summary = {"protocol": "fast", "num_cases": 2, "inferer": {"type": "X"}, "space": "S",
               "metrics": {"net_a": {"lcc": {"1": entry, "2": entry}}}, "seconds_per_volume": {"net_a": 1.234},
               "class_names": {"1": "atrium"}}
    row = " | 2 | 1 | 81.25 ± 6.25 | 81.25 ± 6.25 | n/a | 1.50 ± 0.25 | 0.81 ± 0.06 | 0.81 ± 0.06 | 0.81 ± 0.06 | 1.23 |"
    without_names = {k: v for k, v in summary.items() if k != "class_names"}
    assert "| net_a | lcc | 1 | 2 |" in evaluation._markdown(without_names).splitlines()[6]
    assert evaluation._markdown(summary) == "\n".join([
        "# Evaluation (fast protocol, 2 cases)",
        "",
        'Inferer: `{"type": "X"}`. Space: S.',
        "",
        "| model | post-processing | class | cases | empty pred | Dice % | Jaccard % | 95HD (vox) | ASD (vox) "
        "| 95HD (mm) | ASD (mm) | ASSD (mm) | s / volume |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| net_a | lcc | atrium" + row,
        "| net_a | lcc | 2" + row,
        "",
        "Mean ± standard deviation (ddof=0) over cases. " + metrics.EMPTY_RULE,
        "",
    ])


def test_summary_statistics_by_hand():
    """Population standard deviation (ddof=0) over cases; empty-mask distances are left out, not scored 0."""
    rows = [
        {"model": "ensemble", "postprocessing": "none", "class": 1, "dice": d, "jaccard": d / (2 - d),
         "hd95_vox": h, "asd_vox": h, "hd95_mm": 2 * h, "asd_mm": 2 * h, "assd_mm": 2 * h,
         "empty_pred": h != h, "empty_gt": False}
        for d, h in ((0.2, 3.0), (0.6, 5.0), (0.7, 10.0), (0.0, math.nan))
    ]
    s = summarize(rows)["ensemble"]["none"]["1"]
    assert s["n_cases"] == 4 and s["n_empty_pred"] == 1 and s["n_empty_gt"] == 0
    rows[3]["empty_gt"] = True
    assert summarize(rows)["ensemble"]["none"]["1"]["n_empty_gt"] == 1
    mean = (0.2 + 0.6 + 0.7 + 0.0) / 4
    std = math.sqrt(sum((d - mean) ** 2 for d in (0.2, 0.6, 0.7, 0.0)) / 4)
    assert s["dice"]["mean"] == pytest.approx(mean) and s["dice"]["std"] == pytest.approx(std) and s["dice"]["n"] == 4
    assert s["hd95_mm"]["mean"] == pytest.approx(12.0) and s["hd95_mm"]["n"] == 3
    assert s["hd95_mm"]["std"] == pytest.approx(2 * math.sqrt(((3 - 6) ** 2 + (5 - 6) ** 2 + (10 - 6) ** 2) / 3))


def test_disagreement_score_by_hand():
    d = torch.arange(7.0).pow(2).view(1, 1, 7, 1, 1)  # D = 0, 1, 4, ..., 36
    fg = torch.zeros(1, 1, 7, 1, 1)
    fg[0, 0, 3] = 0.9  # predicted foreground at voxel 3 only
    u = torch.cat([1 - fg, fg, torch.zeros_like(d), d], dim=1)  # p (2 classes), entropy, disagreement
    assert inference.disagreement_score(u, margin=0) == pytest.approx(9.0)
    assert inference.disagreement_score(u, margin=1) == pytest.approx((4 + 9 + 16) / 3)
    assert inference.disagreement_score(u, margin=5) == pytest.approx(91 / 7)  # the whole line
    none = torch.cat([torch.ones_like(d), torch.zeros_like(d), torch.zeros_like(d), d], dim=1)
    assert inference.disagreement_score(none, margin=1) == pytest.approx(91 / 7)  # nothing predicted: all voxels
    with pytest.raises(ValueError, match=r"\[1, C \+ 2"):
        inference.disagreement_score(u[:, :3])
    with pytest.raises(ValueError, match="found"):
        inference.disagreement_score(torch.cat([u, u]))


def test_expected_dice_error_by_hand():
    """Two classes: p_fg = 0.9, 0.6, 0.2, 0.1, argmax foreground at the first two voxels; three classes with one
    class never predicted and given (almost) no mass, then given some."""
    fg = torch.tensor([0.9, 0.6, 0.2, 0.1]).view(1, 1, 4, 1, 1)
    zeros = torch.zeros_like(fg)
    u = torch.cat([1 - fg, fg, zeros, zeros], dim=1)
    assert inference.expected_dice_error(u) == pytest.approx(1 - (2 * 1.5 + 1) / (1.8 + 2 + 1))
    p2 = torch.tensor([0.0, 0.0, 0.0, 0.0]).view(1, 1, 4, 1, 1)  # class 2: absent and without mass -> Dice 1
    three = torch.cat([1 - fg - p2, fg, p2, zeros, zeros], dim=1)
    assert inference.expected_dice_error(three) == pytest.approx((1 - (2 * 1.5 + 1) / (1.8 + 2 + 1)) / 2)
    p2 = torch.tensor([0.05, 0.3, 0.3, 0.3]).view(1, 1, 4, 1, 1)  # class 2 never the argmax but 0.95 voxels of mass
    three = torch.cat([1 - fg - p2 + 0.05 * (fg > 0.5), fg - 0.05 * (fg > 0.5), p2, zeros, zeros], dim=1)
    p1 = three[0, 1].flatten()
    e1 = 1 - (2 * float(p1[:2].sum()) + 1) / (float(p1.sum()) + 2 + 1)
    assert inference.expected_dice_error(three) == pytest.approx((e1 + 1 - 1 / (0.95 + 0 + 1)) / 2)
    # a sure, consistent prediction expects no error; an unsure one more
    sure = torch.cat([1 - (fg > 0.5).float(), (fg > 0.5).float(), zeros, zeros], dim=1)
    assert inference.expected_dice_error(sure) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\[1, C \+ 2"):
        inference.expected_dice_error(u[:, :3])


def test_uncertainty_score_picks_the_map_by_name_with_three_classes():
    h = torch.arange(7.0).view(1, 1, 7, 1, 1)  # entropy 0..6
    d = 10 * h  # disagreement 0..60
    fg1 = torch.zeros(1, 1, 7, 1, 1)
    fg1[0, 0, 1] = 0.8  # class 1 at voxel 1
    fg2 = torch.zeros(1, 1, 7, 1, 1)
    fg2[0, 0, 5] = 0.8  # class 2 at voxel 5
    u = torch.cat([1 - fg1 - fg2, fg1, fg2, h, d], dim=1)
    assert inference.uncertainty_score(u, margin=0, which="entropy") == pytest.approx((1 + 5) / 2)
    assert inference.uncertainty_score(u, margin=0) == pytest.approx((10 + 50) / 2)  # disagreement by default
    assert inference.uncertainty_score(u, margin=1, which="entropy") == pytest.approx((0 + 1 + 2 + 4 + 5 + 6) / 6)
    assert inference.disagreement_score(u, margin=1) == pytest.approx(10 * (0 + 1 + 2 + 4 + 5 + 6) / 6)
    with pytest.raises(ValueError, match="which"):
        inference.uncertainty_score(u, which="variance")


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_frozen_for_cpu_folds_batch_norm_and_keeps_outputs(memory_format):
    net = tiny_dualnet(memory_format=memory_format).eval()
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm3d)):  # non-trivial statistics to fold
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 16, 16, 16)
    for model in (net, inference.SoftmaxOutput(net.net_a)):
        frozen = inference.frozen_for_cpu(model)
        norms = sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
        up = sum(isinstance(m, nn.ConvTranspose3d) for m in model.modules())  # a norm after one is not folded
        assert isinstance(frozen, torch.jit.ScriptModule) and str(frozen.graph).count("aten::batch_norm") <= up < norms
        with torch.no_grad():
            torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-5)


def test_evaluate_jit_optimize_scores_the_same_with_frozen_models(tmp_path, monkeypatch):
    images = [blob_image((16, 16, 16), seed=s) for s in range(2)]
    items = [{"image": MetaTensor(torch.from_numpy(im)[None], meta={"filename_or_obj": f"/d/{i}/image.nii.gz"}),
              "label": torch.from_numpy(mask[None].astype(np.uint8))} for i, (im, mask) in enumerate(images)]
    loader = DataLoader(Dataset(items), batch_size=1)
    frozen = []
    real = inference.frozen_for_cpu
    monkeypatch.setattr(evaluation, "frozen_for_cpu", lambda m: frozen.append(m) or real(m))
    net = tiny_dualnet()
    run = functools.partial(evaluate, net, loader, field_inferer((16, 16, 16), (8, 8, 8)), device="cpu", progress=False)
    eager, jit = run(tmp_path / "eager"), run(tmp_path / "jit", jit_optimize=True)
    assert len(frozen) == 3 and not eager["jit_optimize"] and jit["jit_optimize"]
    assert json.dumps(jit["metrics"]) == json.dumps(eager["metrics"])
    assert not run(tmp_path / "amp", jit_optimize=True, amp=True)["jit_optimize"] and len(frozen) == 3  # not under autocast
