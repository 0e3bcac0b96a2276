"""Annotation rounds on Left Atrium: which 4 cases should be labeled next?

The pool is the first 64 ids of train.list, validation the last 16 (every run). Round 1: the first 4
ids labeled, the other 60 unlabeled, the full method with ``la_cpu.yaml``'s budget: this is the
``full`` 5 % run of ``benchmarks/la_cpu.py`` (``bundle/runs/la_cpu_full_5pct_s<seed>``, trained here
if missing). Its best model then picks 4 more cases of the 60 to "annotate" (their labels revealed):

- ``disagreement``: the highest :func:`monai_dualssl.disagreement_score` (the MONAI Label app's "next
  image" score; fast protocol);
- ``expected_dice``: the highest :func:`monai_dualssl.expected_dice_error` (how far the ensemble's softmax
  is from its own argmax; on the LA validation cases it ranked the cases by their true Dice error better than
  the disagreement score; fast protocol);
- ``random``: 4 drawn at random (``numpy.random.default_rng(seed)``);
- ``epistemic``: the highest MC-dropout entropy as MONAI Label's ``EpistemicScoring`` computes it
  (the model in train mode, 10 sliding-window passes of the ensemble, softmax, the background channel
  dropped, probabilities <= 0 set to 5e-5, per voxel ``sum_c -m_c log m_c`` of the mean ``m`` over the
  passes, then the mean over the volume);
- ``next_ids``: ids 5-8, the field's fixed split: round 2 is then the ``full`` 10 % run of la_cpu.py.

Round 2 retrains from scratch (same budget and seed) with the 8 labeled cases first in a list file of
its own (``--train_list``), the other 56 pool cases unlabeled, and is evaluated as the la_cpu study
does (field protocol, best and final checkpoints). Each seed also draws the random choice. Resumable, also
on a machine without the earlier run folders: a selection or a round-2 run found in its folder
(``selection.json``, ``record.json``) or in the committed ``bundle/docs/results/al_simulation.json`` is not
redone, and round 1 is retrained only when a selection still needs its model.

    python benchmarks/al_simulation.py --dataset_dir /data/la2018 --threads 1 --plan 0 &   # two at a time
    python benchmarks/al_simulation.py --dataset_dir /data/la2018 --threads 1 --plan 1 &
    python benchmarks/al_simulation.py --collect bundle/docs/results/al_simulation.json   # table, tests, figure
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import la_cpu  # noqa: E402

STRATEGIES = ("random", "disagreement", "expected_dice", "epistemic", "next_ids")  # random first: with --plan 0 and 1
# one process starts with a run that needs no round 1 while the other trains it
POOL, VAL, ROUND1, PICK = 64, 16, 4, 4
MC_SAMPLES = 10
RESULTS = la_cpu.BUNDLE / "docs" / "results" / "al_simulation.json"


def run_dir(strategy: str, seed: int) -> Path:
    return la_cpu.BUNDLE / "runs" / f"al_{strategy}_s{seed}"


def epistemic_entropy(probs: list) -> float:
    """MONAI Label's EpistemicScoring of ``probs`` (one ``[C, *spatial]`` array a pass)."""
    stack = np.stack(probs)[:, 1:].astype(np.float32)
    stack[stack <= 0] = 0.00005
    mean = stack.mean(axis=0)
    return float(np.nanmean((-mean * np.log(mean)).sum(axis=0)))


def scores(strategy: str, seed: int, dataset_dir: str, candidates: list[str]) -> dict[str, float]:
    """Score every candidate case with round 1's best model (higher: label it first)."""
    import torch
    from monai.bundle import ConfigParser

    import monai_dualssl

    if strategy == "random":
        return dict(zip(candidates, np.random.default_rng(seed).random(len(candidates)).tolist()))
    config = ConfigParser()
    config.read_config([str(la_cpu.REPO / c) for c in la_cpu.CONFIGS + ["bundle/configs/evaluate.yaml"]])
    config.update({"bundle_root": str(la_cpu.BUNDLE), "dataset_dir": dataset_dir, "protocol": "fast",
                   "device": "$torch.device('cpu')", "num_labeled": POOL, "num_val": VAL})
    network = monai_dualssl.load_weights(config.get_parsed_content("network_def"), round1_folder(seed) / "models" / "model.pt")
    config["dataset#data"] = [item for item in config.get_parsed_content("datalist")["labeled"]
                              if Path(item["image"]).parent.name in candidates]
    dataset, inferer = config.get_parsed_content("dataset"), config.get_parsed_content("inferer")
    torch.manual_seed(seed)
    result = {}
    for item in dataset:
        case, image = Path(item["image"].meta["filename_or_obj"]).parent.name, item["image"].as_tensor()[None]
        with torch.no_grad():
            if strategy in ("disagreement", "expected_dice"):
                network.eval().output = "uncertainty"
                score = monai_dualssl.disagreement_score if strategy == "disagreement" else monai_dualssl.expected_dice_error
                result[case] = score(inferer(image, network))
            else:  # as EpistemicScoring: the whole model in train mode (dropout and batch statistics)
                network.train().output = "logits"
                result[case] = epistemic_entropy([torch.softmax(inferer(image, network), 1)[0].numpy() for _ in range(MC_SAMPLES)])
        print(f"  {strategy} s{seed} {case}: {result[case]:.5f}", flush=True)
    return result


def selections() -> dict[str, dict]:
    """Every selection made so far by round-2 folder name: the committed ones, then those in ``bundle/runs``."""
    found = json.loads(RESULTS.read_text())["selections"] if RESULTS.is_file() else {}
    for path in sorted((la_cpu.BUNDLE / "runs").glob("al_*_s*/selection.json")):
        found[path.parent.name] = json.loads(path.read_text())
    return found


def round1_folder(seed: int) -> Path:
    return la_cpu.BUNDLE / "runs" / la_cpu.run_name("full", 5, seed)


def train_round1(seed: int, dataset_dir: str, threads: int | None) -> None:
    """Round 1 of ``seed`` trained and evaluated to its end (its ``record.json``), resumed if it was killed
    (a killed run already has a best ``models/model.pt``, from before its end). Under an exclusive lock
    on ``<folder>.lock``: a second process that needs it (``--plan 0`` and ``--plan 1``) waits for it
    instead of training it into the same folder."""
    folder = round1_folder(seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "record.json").is_file():
            la_cpu.one_run("full", 5, seed, dataset_dir, threads)


def select(strategy: str, seed: int, dataset_dir: str, threads: int | None = None) -> list[str]:
    """The 8 labeled ids of round 2 (round 1's 4, then the 4 picked), read back if made before; round 1 is
    trained (or its killed run resumed) first if a selection needs its model and it has not finished."""
    path, made = run_dir(strategy, seed) / "selection.json", selections()
    if path.parent.name in made:
        return made[path.parent.name]["labeled"]
    if strategy != "random":
        train_round1(seed, dataset_dir, threads)
    ids = la_cpu_ids(dataset_dir)
    candidates = ids[ROUND1:POOL]
    score = scores(strategy, seed, dataset_dir, candidates)
    picked = sorted(candidates, key=lambda c: -score[c])[:PICK]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"labeled": ids[:ROUND1] + picked, "picked": picked, "scores": score}, indent=2))
    return ids[:ROUND1] + picked


def la_cpu_ids(dataset_dir: str) -> list[str]:
    return [line.strip() for line in (Path(dataset_dir) / "train.list").read_text().splitlines() if line.strip()]


def round2(strategy: str, seed: int, dataset_dir: str, threads: int | None) -> dict:
    """The selection (round 1 first if it needs it), round 2 and its record."""
    if strategy == "next_ids":  # the first 8 ids: the la_cpu study's full 10 % run
        record = la_cpu.finished(la_cpu.RESULTS).get(la_cpu.run_name("full", 10, seed))
        record = record or la_cpu.one_run("full", 10, seed, dataset_dir, threads)
        return {**record, "strategy": strategy, "seed": seed, "labeled": la_cpu_ids(dataset_dir)[:8]}
    labeled = select(strategy, seed, dataset_dir, threads)
    ids = la_cpu_ids(dataset_dir)
    order = labeled + [i for i in ids[:POOL] if i not in labeled] + ids[-VAL:]
    folder = run_dir(strategy, seed)
    (folder / "train.list").write_text("\n".join(order) + "\n")
    overrides = {**la_cpu.RUNS["full"]["overrides"], "num_labeled": 8, "num_val": VAL, "seed": seed,
                 "train_list": str(folder / "train.list")}
    record = la_cpu.train_and_evaluate(folder.name, la_cpu.CONFIGS, overrides, dataset_dir, threads)
    record = {**record, "strategy": strategy, "seed": seed, "labeled": labeled}
    (folder / "record.json").write_text(json.dumps(record, indent=2))
    return record


def agreement(made: dict[str, dict]) -> list[dict]:
    """Per seed and pair of scored strategies: Spearman correlation of their scores over the candidates, and how
    many of the 4 picked cases they share."""
    from scipy.stats import spearmanr

    rows = []
    for seed in la_cpu.SEEDS:
        scored = [s for s in STRATEGIES if s != "random" and run_dir(s, seed).name in made]
        for i, a in enumerate(scored):
            for b in scored[i + 1:]:
                x, y = made[run_dir(a, seed).name], made[run_dir(b, seed).name]
                cases = sorted(x["scores"])
                rows.append({"seed": seed, "strategies": [a, b], "shared_picks": len(set(x["picked"]) & set(y["picked"])),
                             "spearman": round(float(spearmanr([x["scores"][c] for c in cases],
                                                               [y["scores"][c] for c in cases]).statistic), 3)})
    return rows


def case_spread(records: list[dict], which: str = "final") -> list[dict]:
    """Per strategy, the worst and the median validation case's Dice of each seed's run (``which`` checkpoint) and
    their means over the seeds: where a selection's gain lies, on the typical case or on the hardest."""
    import numpy as np

    rows = []
    for strategy in dict.fromkeys(r["strategy"] for r in records):
        dice = [list(r["evaluation"][which]["per_case_dice"].values()) for r in records if r["strategy"] == strategy]
        worst, median = [float(np.min(d)) for d in dice], [float(np.median(d)) for d in dice]
        rows.append({"strategy": strategy, "checkpoint": which, "seeds": len(dice),
                     "worst_case_dice": {"mean": float(np.mean(worst)), "per_seed": np.round(worst, 5).tolist()},
                     "median_case_dice": {"mean": float(np.mean(median)), "per_seed": np.round(median, 5).tolist()}})
    return rows


def collect(output: Path) -> None:
    """Validation Dice after round 2 per strategy (mean ± std over seeds) with round 1 (``round1``, 5 %) for
    reference, each strategy tested against random (Wilcoxon, as ``la_cpu.paired_tests``), the strategies'
    :func:`agreement`, the :func:`case_spread`, and a figure."""
    done, study = la_cpu.finished(output, "al_*_s*"), la_cpu.finished(la_cpu.RESULTS)
    records = []
    for seed in la_cpu.SEEDS:
        path = round1_folder(seed) / "record.json"  # the run whose model made the selections
        record = json.loads(path.read_text()) if path.is_file() else done.get(path.parent.name)
        if record:
            records.append({**record, "strategy": "round1", "config": "round1", "labels_percent": 5, "seed": seed})
        for strategy in STRATEGIES:
            name = la_cpu.run_name("full", 10, seed) if strategy == "next_ids" else run_dir(strategy, seed).name
            record = study.get(name) or done.get(name)  # next_ids: the la_cpu study's own record first
            if record:
                records.append({**record, "strategy": strategy, "config": strategy, "labels_percent": 10, "seed": seed})
    order = ("round1",) + STRATEGIES
    rows = la_cpu.aggregate(records, order)
    tests = [t for strategy in STRATEGIES[1:] for t in la_cpu.paired_tests(records, strategy, ("random",))]
    output.parent.mkdir(parents=True, exist_ok=True)
    made = selections()
    agree, spread = agreement(made), case_spread(records)
    output.write_text(la_cpu.records_json({"summary": rows, "tests": tests, "case_spread": spread, "selections": made,
                                           "agreement": agree, "runs": records}))
    la_cpu.figure(records, output.with_suffix(".png"), order, curves=STRATEGIES)
    print(f"{len(records)} runs -> {output}, {output.with_suffix('.png')}")
    print(la_cpu.report(rows, tests))
    for row in spread:
        worst, median = row["worst_case_dice"], row["median_case_dice"]
        print(f"{row['strategy']}: worst case {100 * worst['mean']:.1f} % ({', '.join(f'{100 * v:.1f}' for v in worst['per_seed'])}),"
              f" median case {100 * median['mean']:.2f} % ({', '.join(f'{100 * v:.2f}' for v in median['per_seed'])})")
    for row in agree:
        print(f"seed {row['seed']}, {' vs '.join(row['strategies'])}: Spearman {row['spearman']:+.3f}, {row['shared_picks']} picks shared")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=os.environ.get("LA2018_DIR"), help="LA folder holding train.list")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(la_cpu.SEEDS))
    parser.add_argument("--plan", type=int, choices=(0, 1), help="every other run of the plan (two processes)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--collect", type=Path, help="gather the finished runs into this JSON file")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect)
        return
    if not args.dataset_dir:
        parser.error("--dataset_dir is required to train")
    plan = [(s, seed) for seed in args.seeds for s in args.strategies]
    for strategy, seed in plan if args.plan is None else plan[args.plan :: 2]:
        if strategy != "next_ids" and run_dir(strategy, seed).name in la_cpu.finished(RESULTS, "al_*_s*"):
            continue
        record = round2(strategy, seed, args.dataset_dir, args.threads)
        print(json.dumps({"strategy": strategy, "seed": seed, "labeled": record["labeled"]}), flush=True)


if __name__ == "__main__":
    main()
