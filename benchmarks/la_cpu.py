"""The reduced Left Atrium study (la_cpu.yaml): seeds, label fractions, ablations, paired tests.

Every run has the same budget (la_cpu.yaml), its own seed and label fraction (the first 4 or 8 ids of
train.list labeled, the last 16 for validation in every run), trains with ``--resume True`` (a run
killed part-way continues), then evaluates with evaluate.yaml's field protocol both its best
checkpoint (``models/model.pt``, chosen on the validation cases) and its final one
(``checkpoints/final.pt``). Each finished run leaves ``runs/la_cpu_<config>_<labels>pct_s<seed>/record.json``
with both evaluations' summaries, the per-case Dice, wall times and the training curves (validation
Dice; the KL weights' mean and spread on kept voxels) read from its TensorBoard log. Runs whose record
exists, in ``bundle/runs`` or among the runs of the committed ``bundle/docs/results/la_cpu.json``, are
skipped, so the study resumes where it stopped, also on a machine that has none of the earlier run folders;
``--collect`` keeps the committed runs and adds (or replaces them by) the records found in ``bundle/runs``.

    python benchmarks/la_cpu.py --dataset_dir /data/la2018 --threads 1 --plan 0 &   # two at a time,
    python benchmarks/la_cpu.py --dataset_dir /data/la2018 --threads 1 --plan 1 &   # each its share
    python benchmarks/la_cpu.py --collect bundle/docs/results/la_cpu.json            # tables, tests, figure

``--configs``/``--labels``/``--seeds`` select runs by hand instead of the plan. Runs write their best
ensemble to their own run folder, never to ``bundle/models``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
RESULTS = BUNDLE / "docs" / "results" / "la_cpu.json"
CONFIGS = ["bundle/configs/train.yaml", "bundle/configs/la.yaml", "bundle/configs/la_cpu.yaml"]
SUPERVISED = ["bundle/configs/supervised.yaml"]
# the paper's entropy ranking and KL setting (train.yaml's defaults when the runs that use them began): pinned, so
# that later changes of train.yaml's defaults leave the study's configurations as they were run
PAPER = {"filter_scope": "batch", "kl_rectify": True}
RUNS = {
    "supervised": {"configs": SUPERVISED, "overrides": {}},
    "full": {"configs": [], "overrides": PAPER},
    "no_kl": {"configs": [], "overrides": {**PAPER, "kl_weighting": False}},
    "no_filter": {"configs": [], "overrides": {**PAPER, "entropy_filter": False}},
    "no_proto": {"configs": [], "overrides": {**PAPER, "use_proto": False}},
    # plain cross pseudo supervision: no filter, no KL weighting, no prototype, no cosine term
    "cps": {"configs": [], "overrides": {**PAPER, "entropy_filter": False, "kl_weighting": False, "use_proto": False,
                                         "use_cos": False}},
    # the KL weighting's settings
    "kl_detach": {"configs": [], "overrides": {**PAPER, "detach_weight": True}},
    "kl_no_rectify": {"configs": [], "overrides": {**PAPER, "kl_rectify": False}},
    "kl_t2": {"configs": [], "overrides": {**PAPER, "temperature": 2.0}},
    # the entropy filter and the prototypes' reliable voxels ranked within each pseudo-class: train.yaml's default
    "full_class": {"configs": [], "overrides": {"filter_scope": "class", "kl_rectify": True}},
    # both changes that beat the paper's setting over 3 seeds: ranked per class, no rectification term
    "class_no_rectify": {"configs": [], "overrides": {"filter_scope": "class", "kl_rectify": False}},
}
LABELED = {10: 8, 5: 4}   # % of the 80 volumes -> labeled cases (the first ids of train.list)
SEEDS = (1337, 2, 3)
# the study's order: the main comparison first, then 5 %, then the ablations and the KL settings
PLAN = ([("supervised", 10, s) for s in SEEDS] + [("full", 10, s) for s in SEEDS]
        + [(c, 5, s) for s in SEEDS for c in ("supervised", "full")]
        + [(c, 10, s) for s in SEEDS for c in ("no_kl", "no_filter", "cps")]
        + [(c, 10, s) for s in SEEDS for c in ("kl_detach", "kl_no_rectify", "kl_t2")]
        + [("full_class", 10, s) for s in SEEDS] + [("class_no_rectify", 10, s) for s in SEEDS])
SUMMARY_KEYS = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm")
CURVES = ("val_mean_dice", "kl_w_mean", "kl_w_std", "kl_mean")


def run_name(config: str, labels: int, seed: int) -> str:
    return f"la_cpu_{config}_{labels}pct_s{seed}"


def command(workflow: str, configs: list[str], dataset_dir: str, name: str, overrides: dict) -> list[str]:
    """``python -m monai.bundle run <workflow>`` with the merged configs and CLI overrides."""
    files = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    args = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", files,
            "--dataset_dir", dataset_dir, "--run_name", name, "--model_dir", f"bundle/runs/{name}/models"]
    for key, value in overrides.items():  # paths in the repository relative to it (the runs' working directory)
        args += [f"--{key}", str(value.relative_to(REPO) if isinstance(value, Path) and value.is_relative_to(REPO) else value)]
    return args


def finished(results: Path, pattern: str = "la_cpu_*pct_s*") -> dict[str, dict]:
    """Every finished run's record by run name: the runs kept in ``results`` (a study's committed JSON), then
    ``bundle/runs/<pattern>/record.json`` (a run finished here, which replaces a kept one of the same name)."""
    records = {r["run"]: r for r in json.loads(results.read_text())["runs"]} if results.is_file() else {}
    for path in sorted((BUNDLE / "runs").glob(f"{pattern}/record.json")):
        record = json.loads(path.read_text())
        records[record["run"]] = record
    return records


def records_json(records: dict) -> str:
    """``records`` as JSON with the checkout's path left out of every path into a ``bundle/`` folder (records of
    runs made before the commands held relative paths, in this checkout or another), so the results name no
    machine path."""
    text = json.dumps(records, indent=2).replace(str(REPO) + "/", "")
    return re.sub(r"(?<![\w.])/[^\s\"',]*?/(?=bundle/)", "", text) + "\n"


def timed(args: list[str], log: Path, threads: int | None, append: bool = False) -> float:
    """Run ``args`` from the repository root, output to ``log`` (added to its end with ``append``, so a
    resumed training keeps the log of its earlier legs); the wall time in seconds."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log, "a" if append else "w") as out:
        subprocess.run(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def per_case_dice(eval_dir: Path) -> dict[str, float]:
    """Ensemble Dice per case (no post-processing; the mean over foreground classes) from metrics.csv."""
    values: dict[str, list[float]] = {}
    with open(eval_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row["model"] == "ensemble" and row["postprocessing"] == "none":
                values.setdefault(row["case"], []).append(float(row["dice"]))
    return {case: sum(v) / len(v) for case, v in values.items()}


def curves(run_dir: Path, epoch_length: int) -> dict[str, list[list[float]]]:
    """``[iteration, value]`` series of the TensorBoard log (validation Dice, KL weight statistics); the
    validation Dice is logged per epoch (validation runs at a multiple of ``epoch_length``). A resumed run logs
    the steps after its last checkpoint again: the later value of a step is the one kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    scale = {"val_mean_dice": epoch_length}
    last = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in CURVES if tag in tags}
    return {tag: [[step * scale.get(tag, 1), round(v, 5)] for step, v in sorted(values.items())] for tag, values in last.items()}


def train_and_evaluate(name: str, configs: list[str], overrides: dict, dataset_dir: str, threads: int | None) -> dict:
    """Train run ``name`` (``bundle/runs/<name>``, resuming a killed run), evaluate its best and final
    checkpoints; the record's common fields (commands, wall times, curves, both evaluations)."""
    run_dir = BUNDLE / "runs" / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
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
                            "wall_seconds": round(seconds, 1), "per_case_dice": per_case_dice(run_dir / "eval" / which),
                            "protocol": summary["protocol"], "metrics": summary["metrics"]}
    import torch

    final = torch.load(run_dir / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    return {
        "run": name, "configs": configs, "overrides": overrides, "threads": threads,
        "train_command": "python " + " ".join(train[1:]).replace(dataset_dir, "<dataset_dir>"),
        "train_wall_seconds": round(train_s, 1), "train_resumed": resumed,  # then the time of the last leg only
        "iterations": int(final["trainer"]["iteration"]),
        "best_epoch": int(final["validation"]["best_metric_epoch"]),
        "curves": curves(run_dir, int(final["trainer"]["epoch_length"])),
        "evaluation": evaluated,
    }


def one_run(config: str, labels: int, seed: int, dataset_dir: str, threads: int | None) -> dict:
    """Train and evaluate one run of the study (best and final checkpoints); write and return its record."""
    name = run_name(config, labels, seed)
    spec = RUNS[config]
    overrides = {**spec["overrides"], "num_labeled": LABELED[labels], "seed": seed}
    record = train_and_evaluate(name, CONFIGS + spec["configs"], overrides, dataset_dir, threads)
    record = {"run": name, "config": config, "labels_percent": labels, "seed": seed, **record}
    (BUNDLE / "runs" / name / "record.json").write_text(json.dumps(record, indent=2))
    return record


# ---- the report ----------------------------------------------------------------------------------


def _foreground(metrics: dict) -> dict:
    """The ensemble's metrics without post-processing for the (only) foreground class."""
    by_class = metrics["ensemble"]["none"]
    return by_class[sorted(by_class)[0]] if len(by_class) == 1 else by_class["mean"]


def aggregate(records: list[dict], order: tuple[str, ...] = tuple(RUNS)) -> list[dict]:
    """Per (config, labels) and checkpoint, configs in ``order``: mean ± std over seeds of each run's mean metrics."""
    import numpy as np

    rows = []
    key = lambda r: (r["labels_percent"], order.index(r["config"]))  # noqa: E731
    for (labels, _), group in itertools.groupby(sorted(records, key=key), key=key):
        group = list(group)
        for which in ("final", "best"):
            row = {"config": group[0]["config"], "labels_percent": labels, "checkpoint": which,
                   "seeds": [r["seed"] for r in group]}
            for metric in ("dice", "jaccard", "hd95_vox", "asd_vox"):
                values = np.array([_foreground(r["evaluation"][which]["metrics"])[metric]["mean"] for r in group])
                row[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                               "per_seed": values.round(5).tolist()}
            rows.append(row)
    return rows


def paired_tests(records: list[dict], reference: str = "full", others: tuple[str, ...] | None = None) -> list[dict]:
    """``reference`` vs every other config (or those in ``others``), per labels and checkpoint: the Wilcoxon signed-rank test over the
    (case, seed) pairs, the gain in each seed, and, as the pairs of one case under several seeds are not
    independent, the Wilcoxon test over the cases of the gain averaged over the seeds."""
    import numpy as np
    from scipy.stats import wilcoxon

    index = {(r["config"], r["labels_percent"], r["seed"]): r for r in records}
    tests = []
    for (config, labels) in sorted({(r["config"], r["labels_percent"]) for r in records}):
        if config == reference or (others is not None and config not in others):
            continue
        for which in ("final", "best"):
            gains = {}  # seed -> case -> Dice gain of the reference
            for seed in SEEDS:
                ours, theirs = index.get((reference, labels, seed)), index.get((config, labels, seed))
                if ours and theirs:
                    a, b = ours["evaluation"][which]["per_case_dice"], theirs["evaluation"][which]["per_case_dice"]
                    gains[seed] = {case: a[case] - b[case] for case in sorted(a)}
            diff = [g for by_case in gains.values() for g in by_case.values()]
            if len(diff) < 6:
                continue
            test = {"reference": reference, "other": config, "labels_percent": labels, "checkpoint": which,
                    "pairs": len(diff), "mean_gain_dice_points": round(100 * float(np.mean(diff)), 2),
                    "wilcoxon_p": float(wilcoxon(diff).pvalue),
                    "gain_per_seed": {str(s): round(100 * float(np.mean(list(g.values()))), 2) for s, g in gains.items()}}
            if len(gains) > 1:
                per_case = np.mean([list(g.values()) for g in gains.values()], axis=0)
                test["cases"], test["case_mean_wilcoxon_p"] = len(per_case), float(wilcoxon(per_case).pvalue)
            tests.append(test)
    return tests


def _cell(stat: dict, scale: float = 1.0) -> str:
    return f"{stat['mean'] * scale:.2f}" + (f" ± {stat['std'] * scale:.2f}" if stat["std"] is not None else "")


def report(rows: list[dict], tests: list[dict]) -> str:
    lines = ["| labels | run | checkpoint | seeds | Dice % | Jaccard % | 95HD (vox) | ASD (vox) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['labels_percent']} % | {r['config']} | {r['checkpoint']} | {len(r['seeds'])} | {_cell(r['dice'], 100)} "
                     f"| {_cell(r['jaccard'], 100)} | {_cell(r['hd95_vox'])} | {_cell(r['asd_vox'])} |")
    lines += ["", "| labels | reference vs | checkpoint | pairs | mean gain (Dice points) | Wilcoxon p | gain per seed "
              "| Wilcoxon p, cases (seed mean) |", "|---|---|---|---|---|---|---|---|"]
    for t in tests:
        per_seed = ", ".join(f"{g:+.2f}" for g in t["gain_per_seed"].values())
        by_case = f"{t['case_mean_wilcoxon_p']:.3g} ({t['cases']})" if "cases" in t else ""
        lines.append(f"| {t['labels_percent']} % | {t['reference']} vs {t['other']} | {t['checkpoint']} | {t['pairs']} "
                     f"| {t['mean_gain_dice_points']:+.2f} | {t['wilcoxon_p']:.3g} | {per_seed} | {by_case} |")
    return "\n".join(lines)


def figure(records: list[dict], path: Path, order: tuple[str, ...] = tuple(RUNS),
           curves: tuple[str, ...] = ("full", "supervised")) -> None:
    """Dice per configuration with the seeds as points (final and best), and validation Dice over iterations
    of the 10 % runs of ``curves``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["labels_percent"], r["config"]) for r in records}, key=lambda g: (-g[0], order.index(g[1])))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (labels, config) in enumerate(groups):
        for shift, which, marker in ((-0.12, "final", "o"), (0.12, "best", "^")):
            values = [100 * _foreground(r["evaluation"][which]["metrics"])["dice"]["mean"]
                      for r in records if (r["labels_percent"], r["config"]) == (labels, config)]
            left.scatter([i + shift] * len(values), values, marker=marker, color="C0" if which == "final" else "C1",
                         label=which if i == 0 else None)
    left.set_xticks(range(len(groups)), [f"{c}, {l} %" for l, c in groups], fontsize=8, rotation=35, ha="right")
    left.set_ylabel("mean Dice % (16 validation cases)")
    left.legend(title="checkpoint")
    for r in records:
        if r["config"] in curves and r["labels_percent"] == 10 and "val_mean_dice" in r["curves"]:
            steps, values = zip(*r["curves"]["val_mean_dice"])
            right.plot(steps, [100 * v for v in values], color=f"C{2 + curves.index(r['config'])}", alpha=0.7,
                       label=f"{r['config']} (seed {r['seed']})")
    right.set_xlabel("iteration")
    right.set_ylabel("validation Dice % (fast protocol)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def collect(output: Path) -> None:
    """Gather the finished runs (those ``output`` holds and those in ``bundle/runs``) into ``output``, with the
    aggregate and the tests; print the tables."""
    records = [record for _, record in sorted(finished(output).items())]
    rows, tests = aggregate(records), paired_tests(records)
    tests += paired_tests(records, reference="supervised") + paired_tests(records, "full_class", ("class_no_rectify",))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(records_json({"summary": rows, "tests": tests, "runs": records}))
    figure(records, output.with_suffix(".png"))
    print(f"{len(records)} runs -> {output}, {output.with_suffix('.png')}")
    print(report(rows, tests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", help="LA folder holding train.list")
    parser.add_argument("--plan", type=int, choices=(0, 1), help="run every other run of the study's plan (0 or 1)")
    parser.add_argument("--configs", nargs="+", choices=list(RUNS))
    parser.add_argument("--labels", nargs="+", type=int, choices=list(LABELED), default=[10])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--collect", type=Path, help="gather the finished runs' records into this JSON file")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect)
        return
    if not args.dataset_dir or (args.plan is None) == (args.configs is None):
        parser.error("--dataset_dir and one of --plan / --configs are required to train")
    runs = PLAN[args.plan :: 2] if args.plan is not None else list(itertools.product(args.configs, args.labels, args.seeds))
    for config, labels, seed in runs:
        if run_name(config, labels, seed) in finished(RESULTS):
            continue
        record = one_run(config, labels, seed, args.dataset_dir, args.threads)
        print(json.dumps({k: record[k] for k in ("run", "train_wall_seconds", "iterations")}), flush=True)


if __name__ == "__main__":
    main()
