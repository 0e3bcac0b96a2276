"""The reduced ACDC study (acdc_cpu.yaml): supervised only vs the full method (with the paper's batch-wide entropy
filter, and with ``filter_scope: class``), 4 classes, per-structure metrics and the paired tests of ``PAIRS``.

Every run has the same budget (acdc_cpu.yaml) and labels (the first 14 ids of train.list, i.e. 10 % of the 140
training volumes; the other 126 unlabeled), validates on val.list (checkpoint selection), trains with
``--resume True`` (a run killed part-way continues), then evaluates with evaluate.yaml's field protocol on the 40
volumes of test.list (acdc.yaml's ``eval_split: test``) both its best checkpoint (``models/model.pt``, chosen on
val.list) and its final one (``checkpoints/final.pt``). Each finished run leaves
``runs/acdc_cpu_<config>_<labels>pct_s<seed>/record.json`` with both evaluations' summaries (ensemble and each
network, with and without per-class largest-component post-processing; Dice, Jaccard, 95HD and ASD in voxels
and mm per structure and their mean), the per-case Dice per structure, wall times and the training curves
read from its TensorBoard log. Runs whose record exists (in ``bundle/runs``, or among the runs of the committed
``bundle/docs/results/<prefix>.json``) are skipped, so the study resumes where it stopped, on any machine.
One seed by default (each full-method run is about an hour on one core); ``--seeds`` adds more.

    python benchmarks/acdc_cpu.py --dataset_dir /data/ACDC --threads 1 --configs supervised &   # side by side,
    python benchmarks/acdc_cpu.py --dataset_dir /data/ACDC --threads 1 --configs full &         # one core each
    python benchmarks/acdc_cpu.py --collect bundle/docs/results/acdc_cpu.json                  # tables, test, figure

Runs write their best ensemble to their own run folder, never to ``bundle/models``. ``--override KEY VALUE``
(repeatable) passes further config overrides to training and evaluation and is kept in the record (for trying
the driver on a small budget; the study itself uses none).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from la_cpu import command, curves, finished, records_json, timed  # noqa: E402  (the LA study's runner, shared)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = ["bundle/configs/train.yaml", "bundle/configs/acdc.yaml", "bundle/configs/acdc_cpu.yaml"]
EARLIER_SCHEDULE = "[375, 750]"  # acdc_cpu.yaml's lr milestones when the study's runs were made (now 750 only)
RUNS = {
    "supervised": {"configs": ["bundle/configs/supervised.yaml"], "overrides": {"lr_milestones": EARLIER_SCHEDULE}},
    # the paper's batch-wide entropy ranking (acdc.yaml's default was batch when this run was made)
    "full": {"configs": [], "overrides": {"filter_scope": "batch", "lr_milestones": EARLIER_SCHEDULE}},
    # the entropy filter and the prototypes' reliable voxels ranked within each pseudo-class (acdc.yaml's default)
    "full_class": {"configs": [], "overrides": {"filter_scope": "class", "lr_milestones": EARLIER_SCHEDULE}},
}
PAIRS = (("full", "supervised"), ("full_class", "supervised"), ("full_class", "full"))  # (run, baseline) tested
LABELED = {10: 14}   # % of the 140 training volumes -> labeled volumes (the first ids of train.list: 7 patients)
SEEDS = (1337,)
STRUCTURES = {"1": "RV", "2": "Myo", "3": "LV", "mean": "mean"}
METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")


def run_name(config: str, labels: int, seed: int, prefix: str = "acdc_cpu") -> str:
    return f"{prefix}_{config}_{labels}pct_s{seed}"


def per_case_dice(eval_dir: Path) -> dict[str, dict[str, float]]:
    """Ensemble Dice per case (no post-processing) per structure and their mean, from metrics.csv."""
    values: dict[str, dict[str, float]] = {}
    with open(eval_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row["model"] == "ensemble" and row["postprocessing"] == "none":
                values.setdefault(row["case"], {})[row["class"]] = float(row["dice"])
    return {case: {**d, "mean": sum(d.values()) / len(d)} for case, d in values.items()}


def one_run(config: str, labels: int, seed: int, dataset_dir: str, threads: int | None, extra: dict, prefix: str) -> dict:
    """Train and evaluate one run (best and final checkpoints on test.list); write and return its record."""
    name = run_name(config, labels, seed, prefix)
    spec = RUNS[config]
    run_dir = BUNDLE / "runs" / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    configs = CONFIGS + spec["configs"]
    overrides = {**spec["overrides"], "num_labeled": LABELED[labels], "seed": seed, **extra}
    train = command("training", configs, dataset_dir, name, {**overrides, "resume": True})
    resumed = any((run_dir / "checkpoints").glob("*.pt"))
    train_s = timed(train, run_dir / "logs" / "train.log", threads, append=True)
    evaluated = {}
    for which, ckpt in (("best", run_dir / "models" / "model.pt"), ("final", run_dir / "checkpoints" / "final.pt")):
        evaluate = command("evaluating", configs + ["bundle/configs/evaluate.yaml"], dataset_dir, name,
                           {**overrides, "ckpt_path": ckpt, "eval_dir": run_dir / "eval" / which})
        seconds = timed(evaluate, run_dir / "logs" / f"evaluate_{which}.log", threads)
        summary = json.loads((run_dir / "eval" / which / "summary.json").read_text())
        evaluated[which] = {"command": "python " + " ".join(evaluate[1:]).replace(dataset_dir, "<dataset_dir>"),
                            "wall_seconds": round(seconds, 1), "num_cases": summary["num_cases"],
                            "per_case_dice": per_case_dice(run_dir / "eval" / which),
                            "protocol": summary["protocol"], "inferer": summary["inferer"],
                            "class_names": summary["class_names"], "metrics": summary["metrics"]}
    import torch

    final = torch.load(run_dir / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    record = {
        "run": name, "config": config, "labels_percent": labels, "seed": seed, "configs": configs,
        "overrides": overrides, "threads": threads,
        "train_command": "python " + " ".join(train[1:]).replace(dataset_dir, "<dataset_dir>"),
        "train_wall_seconds": round(train_s, 1), "train_resumed": resumed,  # then the time of the last leg only
        "iterations": int(final["trainer"]["iteration"]),
        "best_epoch": int(final["validation"]["best_metric_epoch"]),
        "curves": curves(run_dir, int(final["trainer"]["epoch_length"])),
        "evaluation": evaluated,
    }
    (run_dir / "record.json").write_text(json.dumps(record, indent=2))
    return record


# ---- the report ----------------------------------------------------------------------------------


def aggregate(records: list[dict]) -> list[dict]:
    """Per (config, labels), checkpoint and structure: the ensemble's metrics without post-processing, as the
    mean over seeds of each run's mean over cases, with the spread over seeds (several seeds) or over the test
    cases (one seed), and the LCC Dice."""
    import numpy as np

    rows = []
    key = lambda r: (r["labels_percent"], list(RUNS).index(r["config"]))  # noqa: E731
    for (labels, _), group in itertools.groupby(sorted(records, key=key), key=key):
        group = list(group)
        for which, cls in itertools.product(("final", "best"), STRUCTURES):
            row = {"config": group[0]["config"], "labels_percent": labels, "checkpoint": which, "class": cls,
                   "structure": STRUCTURES[cls], "seeds": [r["seed"] for r in group]}
            for post, metric in itertools.product(("none", "lcc"), METRICS):
                stats = [r["evaluation"][which]["metrics"]["ensemble"][post][cls][metric] for r in group]
                means = np.array([np.nan if s["mean"] is None else s["mean"] for s in stats])
                spread, over = ((float(means.std(ddof=1)), "seeds") if len(means) > 1
                                else (stats[0]["std"], "cases"))
                name = metric if post == "none" else f"{metric}_lcc"
                row[name] = {"mean": float(np.nanmean(means)) if np.isfinite(means).any() else None, "spread": spread,
                             "over": over, "n_cases": [s["n"] for s in stats]}
            rows.append(row)
    return rows


def paired_tests(records: list[dict]) -> list[dict]:
    """Wilcoxon signed-rank over the (case, seed) pairs of each of ``PAIRS``, per structure and checkpoint."""
    return [t for run, baseline in PAIRS for t in paired_test(records, run, baseline)]


def paired_test(records: list[dict], run: str, baseline: str) -> list[dict]:
    """Wilcoxon signed-rank over the (case, seed) pairs of ``run`` vs ``baseline``, per structure and checkpoint
    (the records' ``reference`` is the run, ``other`` the baseline)."""
    from scipy.stats import wilcoxon

    index = {(r["config"], r["labels_percent"], r["seed"]): r for r in records}
    tests = []
    for labels, which, cls in itertools.product(sorted({r["labels_percent"] for r in records}), ("final", "best"), STRUCTURES):
        a, b = [], []
        for seed in sorted({r["seed"] for r in records}):
            ours, theirs = index.get((run, labels, seed)), index.get((baseline, labels, seed))
            if ours and theirs:
                cases = sorted(ours["evaluation"][which]["per_case_dice"])
                a += [ours["evaluation"][which]["per_case_dice"][c][cls] for c in cases]
                b += [theirs["evaluation"][which]["per_case_dice"][c][cls] for c in cases]
        if len(a) < 6:
            continue
        diff = [x - y for x, y in zip(a, b)]
        tests.append({"reference": run, "other": baseline, "labels_percent": labels, "checkpoint": which,
                      "structure": STRUCTURES[cls], "pairs": len(a),
                      "mean_gain_dice_points": round(100 * sum(diff) / len(diff), 2),
                      "wilcoxon_p": float(wilcoxon(a, b).pvalue) if any(diff) else 1.0})
    return tests


def _cell(stat: dict, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean'] * scale:.2f}" + (f" ± {stat['spread'] * scale:.2f}" if stat["spread"] is not None else "")


def report(rows: list[dict], tests: list[dict]) -> str:
    lines = ["| labels | run | checkpoint | structure | seeds | Dice % | Dice % (LCC) | Jaccard % | 95HD (mm) | ASD (mm) "
             "| 95HD (vox) | ASD (vox) | ± over |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['labels_percent']} % | {r['config']} | {r['checkpoint']} | {r['structure']} | {len(r['seeds'])} "
                     f"| {_cell(r['dice'], 100)} | {_cell(r['dice_lcc'], 100)} | {_cell(r['jaccard'], 100)} "
                     f"| {_cell(r['hd95_mm'])} | {_cell(r['asd_mm'])} | {_cell(r['hd95_vox'])} | {_cell(r['asd_vox'])} "
                     f"| {r['dice']['over']} |")
    lines += ["", "| labels | run | vs | checkpoint | structure | pairs | mean gain (Dice points) | Wilcoxon p |",
              "|---|---|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t['labels_percent']} % | {t['reference']} | {t['other']} | {t['checkpoint']} | {t['structure']} "
                     f"| {t['pairs']} "
                     f"| {t['mean_gain_dice_points']:+.2f} | {t['wilcoxon_p']:.3g} |")
    return "\n".join(lines)


def figure(records: list[dict], path: Path) -> None:
    """Test Dice per structure (supervised vs full, final and best) and validation Dice over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    configs = [c for c in RUNS if any(r["config"] == c for r in records)]
    width = 0.8 / max(1, 2 * len(configs))
    for i, (config, which) in enumerate(itertools.product(configs, ("final", "best"))):
        runs = [r for r in records if r["config"] == config]
        values = [sum(100 * r["evaluation"][which]["metrics"]["ensemble"]["none"][c]["dice"]["mean"] for r in runs) / len(runs)
                  for c in STRUCTURES]
        left.bar([k + (i - len(configs)) * width + width / 2 for k in range(len(STRUCTURES))], values, width,
                 label=f"{config} ({which})")
    left.set_xticks(range(len(STRUCTURES)), list(STRUCTURES.values()))
    left.set_ylabel("test Dice % (ensemble, mean over the test cases)")
    left.legend(fontsize=8)
    for r in records:
        if "val_mean_dice" in r["curves"]:
            steps, values = zip(*r["curves"]["val_mean_dice"])
            right.plot(steps, [100 * v for v in values], label=f"{r['config']} (seed {r['seed']})")
    right.set_xlabel("iteration")
    right.set_ylabel("validation Dice % (val.list, mean of 3 structures)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def collect(output: Path, prefix: str = "acdc_cpu") -> None:
    """Gather the finished runs (those ``output`` holds and those in ``bundle/runs``) into ``output``, with the
    aggregate and the tests; print the tables."""
    records = [record for _, record in sorted(finished(output, f"{prefix}_*pct_s*").items())]
    if not records:
        raise SystemExit(f"no finished run (bundle/runs/{prefix}_*pct_s*/record.json or {output}) to collect.")
    rows, tests = aggregate(records), paired_tests(records)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(records_json({"summary": rows, "tests": tests, "runs": records}))
    figure(records, output.with_suffix(".png"))
    print(f"{len(records)} runs -> {output}, {output.with_suffix('.png')}")
    print(report(rows, tests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", help="ACDC folder holding train.list, val.list, test.list and data/")
    parser.add_argument("--configs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--labels", nargs="+", type=int, choices=list(LABELED), default=[10])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--override", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a further config override of every run, kept in its record")
    parser.add_argument("--prefix", default="acdc_cpu", help="run folder prefix (bundle/runs/<prefix>_...)")
    parser.add_argument("--collect", type=Path, help="gather the finished runs' records into this JSON file")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect, args.prefix)
        return
    if not args.dataset_dir:
        parser.error("--dataset_dir is required to train")
    extra = dict(args.override)
    results = BUNDLE / "docs" / "results" / f"{args.prefix}.json"
    for config, labels, seed in itertools.product(args.configs, args.labels, args.seeds):
        if run_name(config, labels, seed, args.prefix) in finished(results, f"{args.prefix}_*pct_s*"):
            continue
        record = one_run(config, labels, seed, args.dataset_dir, args.threads, extra, args.prefix)
        print(json.dumps({k: record[k] for k in ("run", "train_wall_seconds", "iterations")}), flush=True)


if __name__ == "__main__":
    main()
