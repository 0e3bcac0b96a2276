"""Does the dual network's uncertainty find its errors? Case scores against Dice, voxel maps against errors.

For a trained bundle (the configs it was trained with, its ``model.pt``) and a labeled split (the
validation cases of the datalist: for Left Atrium the last 16 ids of train.list), every case goes
through the inferer of an evaluation protocol with ``DualNet(output="uncertainty")``, as
``inference.json`` does, and gives:

- per case: the ensemble's Dice (mean over foreground classes), the score of the app's
  ``disagreement`` strategy (:func:`monai_dualssl.disagreement_score`) and the same region mean of the entropy map
  (:func:`monai_dualssl.uncertainty_score`); the Spearman correlation of each score with the Dice error
  ``1 - Dice`` over the cases;
- per voxel: the AUROC with which each map separates misclassified voxels from correct ones, within the
  predicted and true foreground dilated by ``--margin`` voxels (a cube), pooled over the cases. Maps:
  the entropy ``H`` and the disagreement ``D`` that inference writes, and their sum ``H + D`` (both in
  nats); with ``--candidates`` also smoothed and max-pooled entropy, the distance to the predicted
  boundary, each class's probability, each network's entropy, a logistic regression of all the maps scored here
  fitted on the other cases (:func:`held_out_combination`), and the entropy after temperature scaling of each
  network (fitted by NLL on the same voxels);
  with ``--tta`` the entropy of the ensemble averaged over the 8 flips of the spatial axes and the flips'
  mutual information ``H(mean_f p_f) - mean_f H(p_f)`` (8 inferences a case).
- with ``--candidates``, other case scores: :func:`monai_dualssl.expected_dice_error` (how far the mean
  softmax is from its argmax, as a Dice error) and the summed entropy of the region per predicted
  foreground voxel.

Writes ``<output>.json`` and ``<output>.png`` (the scores against Dice; the fraction of misclassified
voxels per decile of each map) and, with ``--montage``, the case with the lowest Dice (image, error,
entropy and disagreement on its middle slice: it shows the data, so it is not written by default).

    python benchmarks/uncertainty_quality.py --dataset_dir /data/la2018 \\
        [--config bundle/configs/train.yaml bundle/configs/la.yaml bundle/configs/la_cpu.yaml] \\
        [--ckpt bundle/models/model.pt] [--protocol fast] [--output bundle/docs/results/uncertainty_la]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from scipy import ndimage
from scipy.stats import rankdata, spearmanr

import monai_dualssl

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["bundle/configs/train.yaml", "bundle/configs/la.yaml", "bundle/configs/la_cpu.yaml"]
MAPS = ("entropy", "disagreement", "entropy+disagreement")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (Mann-Whitney U, ties averaged)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def foreground_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes (1 when a class is absent from both)."""
    values = []
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        total = p.sum() + g.sum()
        values.append(1.0 if total == 0 else 2.0 * np.logical_and(p, g).sum() / total)
    return float(np.mean(values))


def dilated(mask: np.ndarray, margin: int) -> np.ndarray:
    """``mask`` dilated by ``margin`` voxels (a cube; ``margin`` 0: the mask itself, where SciPy would dilate
    until nothing changes)."""
    return ndimage.binary_dilation(mask, np.ones((3,) * mask.ndim, bool), iterations=margin) if margin > 0 else mask


def case_maps(u: torch.Tensor, label: torch.Tensor, margin: int) -> dict:
    """Prediction, error and the maps of one case inside the region (foregrounds dilated by ``margin``)."""
    num_classes = u.shape[1] - 2
    pred = u[0, :num_classes].argmax(0).numpy()
    gt = label[0, 0].numpy().astype(np.int64)
    entropy, disagreement = u[0, num_classes].numpy(), u[0, num_classes + 1].numpy()
    region = dilated((pred > 0) | (gt > 0), margin)
    maps = {"entropy": entropy, "disagreement": disagreement, "entropy+disagreement": entropy + disagreement}
    return {"pred": pred, "gt": gt, "region": region, "error": (pred != gt)[region],
            "maps": {k: v[region] for k, v in maps.items()}, "full": {"entropy": entropy, "disagreement": disagreement,
                                                                      "probs": u[0, :num_classes].numpy()},
            "dice": foreground_dice(pred, gt, num_classes),
            "scores": {w: monai_dualssl.uncertainty_score(u, which=w) for w in monai_dualssl.UNCERTAINTY_MAPS}}


def candidate_maps(case: dict) -> dict[str, np.ndarray]:
    """Other maps tried against the errors (region voxels): smoothed and max-pooled entropy, the
    negative distance to the predicted foreground's boundary, and each class's ensemble probability."""
    h, pred = case["full"]["entropy"], case["pred"] > 0
    maps = {f"gaussian{s}(H)": ndimage.gaussian_filter(h, s) for s in (1, 2, 3)}
    maps.update({f"max(H, gaussian{s}(H))": np.maximum(h, maps[f"gaussian{s}(H)"]) for s in (1, 3)})
    maps.update({f"maxpool{k}(H)": ndimage.maximum_filter(h, k) for k in (3, 5)})
    maps["-distance to the boundary"] = -np.where(pred, ndimage.distance_transform_edt(pred), ndimage.distance_transform_edt(~pred))
    maps.update({f"p{c}": p for c, p in enumerate(case["full"]["probs"])})
    return {k: v[case["region"]] for k, v in maps.items()}


def held_out_combination(features: dict[str, list[np.ndarray]], error: list[np.ndarray], every: int = 4) -> np.ndarray:
    """The best a per-voxel combination of the maps can do on unseen cases: for each case, a logistic regression of
    ``error`` on the standardised ``features`` (``{map: [region values of each case]}``) fitted by L-BFGS on every
    ``every``-th voxel of the other cases scores this case's voxels (leave one case out). Returns the pooled scores."""
    x = torch.from_numpy(np.stack([np.concatenate(v) for v in features.values()], 1).astype(np.float32))
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    y = torch.from_numpy(np.concatenate(error).astype(np.float32))
    case = np.repeat(np.arange(len(error)), [len(e) for e in error])
    scores = np.empty(len(y), np.float32)
    for held_out in range(len(error)):
        train = torch.from_numpy(np.flatnonzero(case != held_out)[::every])
        model = torch.nn.Linear(x.shape[1], 1)
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[train])[:, 0], y[train])
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            scores[case == held_out] = model(x[torch.from_numpy(case == held_out)])[:, 0].numpy()
    return scores


def candidate_scores(u: torch.Tensor, margin: int = 3) -> dict[str, float]:
    """Other case scores of one ``DualNet(output="uncertainty")`` output ``[1, C + 2, *spatial]`` (module doc);
    the region is the app score's: the predicted foreground dilated by ``margin`` voxels (a cube)."""
    num_classes = u.shape[1] - 2
    fg = (u[0, :num_classes].argmax(0) > 0).numpy()
    region = dilated(fg, margin) if fg.any() else np.ones_like(fg)
    return {"expected_dice_error": monai_dualssl.expected_dice_error(u),
            "entropy per predicted voxel": float(u[0, num_classes].numpy()[region].sum() / max(int(fg.sum()), 1))}


def flip_tta(inferer, image: torch.Tensor, network) -> tuple[np.ndarray, np.ndarray]:
    """Entropy of the ensemble's softmax averaged over the 8 flips of the spatial axes (each flipped back),
    and the flips' mutual information ``H(mean_f p_f) - mean_f H(p_f)``; ``image`` ``[1, 1, *spatial]``."""
    import itertools

    probs, entropies = [], []
    for n in range(4):
        for dims in itertools.combinations((2, 3, 4), n):
            with torch.no_grad():
                u = inferer(image.flip(dims), network).float().flip(dims)  # flip(()) leaves it as it is
            num_classes = u.shape[1] - 2
            probs.append(u[0, :num_classes])
            entropies.append(u[0, num_classes])
    mean = torch.stack(probs).mean(0)
    h = -(mean * mean.clamp_min(1e-12).log()).sum(0)
    return h.numpy(), (h - torch.stack(entropies).mean(0)).numpy()


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The temperature ``T`` (a grid of 60 values from 0.3 to 5, log-spaced) minimising the NLL of
    ``softmax(logits / T)``; ``logits`` ``[N, C]``, ``target`` ``[N]``."""
    grid = np.exp(np.linspace(np.log(0.3), np.log(5.0), 60))
    return float(min(grid, key=lambda t: float(torch.nn.functional.cross_entropy(logits / t, target))))


def temperature_scaled(logits_a: torch.Tensor, logits_b: torch.Tensor, target: torch.Tensor) -> dict:
    """Temperatures of each network fitted on the region voxels and the AUROC of the entropy of the
    ensemble of the scaled networks (fitted and scored on the same voxels: the most favourable case)."""
    t_a, t_b = fit_temperature(logits_a, target), fit_temperature(logits_b, target)
    u = monai_dualssl.ensemble_uncertainty(logits_a / t_a, logits_b / t_b)
    entropy, error = u[:, -2], (u[:, :-2].argmax(1) != target).numpy()
    return {"temperature_a": t_a, "temperature_b": t_b, "misclassified": int(error.sum()),
            "auroc_entropy": auroc(entropy.numpy(), error)}


def error_by_decile(values: np.ndarray, error: np.ndarray) -> list[float]:
    """Fraction of misclassified voxels in each tenth of the voxels ordered by ``values``."""
    order = np.argsort(values, kind="stable")
    return [float(part.mean()) for part in np.array_split(error[order], 10)]


def figure(rows: list[dict], deciles: dict, path: Path) -> None:
    """Scores against Dice (one point a case) and the error rate per uncertainty decile of each map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    dice = [100 * r["dice"] for r in rows]
    for ax, which in zip(axes[:2], monai_dualssl.UNCERTAINTY_MAPS):
        ax.scatter([r["scores"][which] for r in rows], dice)
        ax.set_xlabel(f"{which} score (region mean)")
        ax.set_ylabel("Dice %")
    for m, rates in deciles.items():
        axes[2].plot(range(1, 11), [100 * r for r in rates], marker="o", label=m)
    axes[2].set_xlabel("voxel decile of the map (1 = most certain)")
    axes[2].set_ylabel("misclassified voxels %")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def montage(case: dict, path: Path) -> None:
    """The image, the error and both maps of one case on its middle slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = case["gt"].shape[-1] // 2
    panels = [("image", case["image"][..., z], "gray"), ("error (pred != label)", (case["pred"] != case["gt"])[..., z], "Reds"),
              ("entropy", case["full"]["entropy"][..., z], "magma"), ("disagreement", case["full"]["disagreement"][..., z], "magma")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 4))
    for ax, (title, img, cmap) in zip(axes, panels):
        ax.imshow(np.rot90(img), cmap=cmap)
        ax.set_title(f"{title}\n{case['case']} (Dice {100 * case['dice']:.1f} %)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=os.environ.get("LA2018_DIR"), help="the dataset folder of the configs")
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS, help="the bundle configs the model was trained with")
    parser.add_argument("--ckpt", default="bundle/models/model.pt")
    parser.add_argument("--protocol", default="fast", choices=["fast", "field"])
    parser.add_argument("--margin", type=int, default=5, help="dilation of the foregrounds for the voxel AUROC")
    parser.add_argument("--num_cases", type=int, default=None, help="the first N validation cases (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--candidates", action="store_true", help="also score other maps (smoothed entropy, boundary "
                        "distance), each network's temperature scaling (two more inferences a case) and other case scores")
    parser.add_argument("--tta", action="store_true", help="also score the entropy and mutual information over the 8 "
                        "flips of the spatial axes (eight inferences a case)")
    parser.add_argument("--output", default="bundle/docs/results/uncertainty_la", help="<output>.json and <output>.png")
    parser.add_argument("--montage", default=None, help="also write this PNG: the lowest-Dice case's image, error and maps "
                        "(it shows the data: keep it out of the repository if the data may not be shared)")
    args = parser.parse_args()
    monai_dualssl.set_num_threads(args.threads)
    config = ConfigParser()
    config.read_config([str(REPO / c) for c in args.config] + [str(REPO / "bundle/configs/evaluate.yaml")])
    config.update({"bundle_root": str(REPO / "bundle"), "dataset_dir": args.dataset_dir, "protocol": args.protocol,
                   "device": "$torch.device('cpu')", "synthetic": False})
    network = monai_dualssl.load_weights(config.get_parsed_content("network_def"), REPO / args.ckpt).eval()
    network.output = "uncertainty"
    inferer = config.get_parsed_content("inferer")
    dataset = config.get_parsed_content("dataset")
    count = len(dataset) if args.num_cases is None else min(args.num_cases, len(dataset))
    rows, pooled, worst = [], {"error": [], **{m: [] for m in MAPS}}, None
    others: dict[str, list] = {"logits_a": [], "logits_b": [], "target": []}
    start = time.perf_counter()
    for i in range(count):
        item = dataset[i]
        with torch.no_grad():
            u = inferer(item["image"].as_tensor()[None], network).float()
        case = case_maps(u, item["label"].as_tensor()[None], args.margin)
        name = Path(item["image"].meta["filename_or_obj"]).parent.name
        if args.candidates:
            case["scores"] = {**case["scores"], **candidate_scores(u)}
        rows.append({"case": name, "dice": case["dice"], "scores": case["scores"],
                     "region_voxels": int(case["region"].sum()), "errors": int(case["error"].sum())})
        pooled["error"].append(case["error"])
        for m in MAPS:
            pooled[m].append(case["maps"][m])
        if args.candidates:
            region = torch.from_numpy(case["region"])
            for key, net in (("logits_a", network.net_a), ("logits_b", network.net_b)):
                with torch.no_grad():
                    others[key].append(inferer(item["image"].as_tensor()[None], net).float()[0][:, region].T)
                logits = others[key][-1]  # one network's entropy: its "ensemble" with itself
                others.setdefault(f"H of network {key[-1].upper()}", []).append(
                    monai_dualssl.ensemble_uncertainty(logits, logits)[:, -2].numpy())
            others["target"].append(torch.from_numpy(case["gt"])[region])
            for k, v in candidate_maps(case).items():
                others.setdefault(k, []).append(v)
        if args.tta:
            for k, v in zip(("H (8 flips)", "mutual information (8 flips)"), flip_tta(inferer, item["image"].as_tensor()[None], network)):
                others.setdefault(k, []).append(v[case["region"]])
        if worst is None or case["dice"] < worst["dice"]:
            worst = {**case, "case": name, "image": item["image"][0].numpy()}
        print(f"{name}: Dice {100 * case['dice']:.2f}  " + "  ".join(f"{k} {v:.4f}" for k, v in case["scores"].items()), flush=True)
    error = np.concatenate(pooled["error"])
    tried = {k: v for k, v in others.items() if k not in ("logits_a", "logits_b", "target")}
    if args.candidates:
        tried["logistic regression of all maps, leave one case out"] = [
            held_out_combination({**{m: pooled[m] for m in MAPS}, **tried}, pooled["error"])]
    result = {
        "command": "python benchmarks/uncertainty_quality.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if v is not None and k != "dataset_dir") + " --dataset_dir <dataset_dir>",
        "cases": rows,
        "spearman_with_dice_error": {w: float(spearmanr([r["scores"][w] for r in rows], [1 - r["dice"] for r in rows])[0])
                                     for w in rows[0]["scores"]},
        "voxel_auroc": {m: auroc(np.concatenate(pooled[m]), error) for m in MAPS},
        "misclassified_by_decile": {m: error_by_decile(np.concatenate(pooled[m]), error) for m in MAPS},
        **({"candidates": {
            "voxel_auroc": {k: auroc(np.concatenate(v), error) for k, v in tried.items()},
            **({"temperature_scaling": temperature_scaled(*(torch.cat(others[k]) for k in ("logits_a", "logits_b", "target")))}
               if args.candidates else {}),
        }} if args.candidates or args.tta else {}),
        "voxels": int(error.size), "misclassified": int(error.sum()), "margin": args.margin, "protocol": args.protocol,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = REPO / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    figure(rows, result["misclassified_by_decile"], out.with_suffix(".png"))
    if args.montage:
        montage(worst, Path(args.montage))
    print(json.dumps({k: result[k] for k in ("spearman_with_dice_error", "voxel_auroc", "candidates", "voxels", "misclassified")
                      if k in result}, indent=2))


if __name__ == "__main__":
    main()
