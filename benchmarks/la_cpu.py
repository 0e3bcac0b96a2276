"""The reduced Left Atrium study (la_cpu.yaml): supervised-only, the full method and its ablations.

Each run trains with the same budget and seed, then evaluates its best checkpoint (by validation
Dice) with evaluate.yaml's field protocol, and leaves ``runs/<run>/record.json``: the overrides, the
exact commands, wall times, iterations and the per-metric mean and standard deviation on the
validation cases. ``--collect`` gathers the records into one JSON file (bundle/docs/results).

    python benchmarks/la_cpu.py --dataset_dir /data/la2018 --runs full no_proto --threads 1 &
    python benchmarks/la_cpu.py --dataset_dir /data/la2018 --runs supervised no_kl --threads 1 &
    python benchmarks/la_cpu.py --dataset_dir /data/la2018 --runs all_labeled --threads 1
    python benchmarks/la_cpu.py --collect bundle/docs/results/la_cpu.json

Runs write their best ensemble to ``runs/<run>/models/model.pt``, never to ``bundle/models``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = ["bundle/configs/train.yaml", "bundle/configs/la.yaml", "bundle/configs/la_cpu.yaml"]
RUNS = {
    "supervised": {"configs": ["bundle/configs/supervised.yaml"], "overrides": {}},
    "full": {"configs": [], "overrides": {}},
    "no_kl": {"configs": [], "overrides": {"kl_weighting": False}},
    "no_proto": {"configs": [], "overrides": {"use_proto": False}},
    "no_filter": {"configs": [], "overrides": {"entropy_filter": False}},
    # the ceiling of the budget: supervised on all 64 training cases labeled
    "all_labeled": {"configs": ["bundle/configs/supervised.yaml"], "overrides": {"num_labeled": 64}},
}
SUMMARY_KEYS = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm")


def command(workflow: str, configs: list[str], dataset_dir: str, run: str, overrides: dict) -> list[str]:
    """``python -m monai.bundle run <workflow>`` with the merged configs and CLI overrides."""
    files = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    args = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", files,
            "--dataset_dir", dataset_dir, "--run_name", f"la_cpu_{run}",
            "--model_dir", f"bundle/runs/la_cpu_{run}/models"]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


def timed(args: list[str], log: Path, threads: int | None) -> float:
    """Run ``args`` from the repository root, output to ``log``; the wall time in seconds."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def iterations(run_dir: Path) -> int:
    """Iterations the trainer completed, from its final checkpoint."""
    import torch

    state = torch.load(run_dir / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    return int(state["trainer"]["iteration"])


def one_run(name: str, dataset_dir: str, threads: int | None) -> dict:
    """Train and evaluate run ``name``; write and return its record."""
    spec = RUNS[name]
    run_dir = BUNDLE / "runs" / f"la_cpu_{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    configs = CONFIGS + spec["configs"]
    # --resume True: a run killed part-way continues from its last checkpoint (a new one starts, with a warning)
    train = command("training", configs, dataset_dir, name, {**spec["overrides"], "resume": True})
    evaluate = command("evaluating", configs + ["bundle/configs/evaluate.yaml"], dataset_dir, name, spec["overrides"])
    train_s = timed(train, run_dir / "train.log", threads)
    eval_s = timed(evaluate, run_dir / "evaluate.log", threads)
    summary = json.loads((run_dir / "eval" / "field" / "summary.json").read_text())
    record = {
        "run": name,
        "configs": configs,
        "overrides": spec["overrides"],
        "train_command": "python " + " ".join(train[1:]).replace(dataset_dir, "<dataset_dir>"),
        "evaluate_command": "python " + " ".join(evaluate[1:]).replace(dataset_dir, "<dataset_dir>"),
        "threads": threads,
        "train_wall_seconds": round(train_s, 1),
        "evaluate_wall_seconds": round(eval_s, 1),
        "iterations": iterations(run_dir),
        "num_validation_cases": summary["num_cases"],
        "protocol": summary["protocol"],
        "seconds_per_volume": summary["seconds_per_volume"],
        "metrics": summary["metrics"],
    }
    (run_dir / "record.json").write_text(json.dumps(record, indent=2))
    return record


def _cell(metric: dict, scale: float = 1.0) -> str:
    return "-" if metric["mean"] is None else f"{metric['mean'] * scale:.2f} ± {metric['std'] * scale:.2f}"


def table(records: list[dict]) -> str:
    """Markdown table of the records: the ensemble's metrics (mean ± std over the validation cases,
    without and with largest-component post-processing) and each network's Dice."""
    lines = [
        "| run | iterations | train (min) | Dice % | Dice % (LCC) | Jaccard % | 95HD (vox) | ASD (vox) | 95HD (mm) | ASD (mm) | Dice % A / B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r["metrics"]
        ens, lcc = m["ensemble"]["none"]["1"], m["ensemble"]["lcc"]["1"]
        a, b = m["net_a"]["none"]["1"]["dice"]["mean"], m["net_b"]["none"]["1"]["dice"]["mean"]
        lines.append(
            f"| {r['run']} | {r['iterations']} | {r['train_wall_seconds'] / 60:.0f} | {_cell(ens['dice'], 100)} "
            f"| {_cell(lcc['dice'], 100)} | {_cell(ens['jaccard'], 100)} | {_cell(ens['hd95_vox'])} | {_cell(ens['asd_vox'])} "
            f"| {_cell(ens['hd95_mm'])} | {_cell(ens['asd_mm'])} | {a * 100:.2f} / {b * 100:.2f} |"
        )
    return "\n".join(lines)


def collect(output: Path) -> None:
    """Gather every ``runs/la_cpu_<run>/record.json`` (in RUNS order) into ``output``; print the table."""
    records = [json.loads(p.read_text()) for name in RUNS
               if (p := BUNDLE / "runs" / f"la_cpu_{name}" / "record.json").is_file()]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(records, indent=2) + "\n")
    print(f"{len(records)} runs -> {output}")
    print(table(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", help="LA folder holding train.list")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=["supervised", "full"])
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--collect", type=Path, help="gather the finished runs' records into this JSON file")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect)
        return
    if not args.dataset_dir:
        parser.error("--dataset_dir is required to train")
    for name in args.runs:
        record = one_run(name, args.dataset_dir, args.threads)
        print(json.dumps({k: record[k] for k in ("run", "train_wall_seconds", "iterations")}), flush=True)


if __name__ == "__main__":
    main()
