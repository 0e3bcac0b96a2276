"""The annotation simulation's selection (benchmarks/al_simulation.py): MONAI Label's epistemic entropy by hand,
the labeled set of round 2 and the resumable selection file."""

import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import al_simulation  # noqa: E402
import la_cpu  # noqa: E402


def test_epistemic_entropy_by_hand():
    # 2 passes, 2 classes, 2 voxels: background dropped; foreground means 0.5 and 0 (set to 5e-5)
    passes = [np.array([[0.5, 1.0], [0.5, 0.0]]), np.array([[0.7, 1.0], [0.3, 0.0]])]
    expected = (-0.4 * math.log(0.4) - 5e-5 * math.log(5e-5)) / 2
    assert al_simulation.epistemic_entropy(passes) == pytest.approx(expected, rel=1e-5)


@pytest.fixture
def pool(tmp_path, monkeypatch):
    """80 case ids in an LA-like train.list; runs and committed results in ``tmp_path``."""
    ids = [f"case{i:02d}" for i in range(80)]
    data = tmp_path / "la"
    data.mkdir()
    (data / "train.list").write_text("\n".join(ids) + "\n")
    monkeypatch.setattr(la_cpu, "BUNDLE", tmp_path / "bundle")
    monkeypatch.setattr(al_simulation, "RESULTS", tmp_path / "al_simulation.json")
    return ids, data


def test_random_selection_keeps_round_one_and_picks_from_the_pool_once(pool, tmp_path):
    ids, data = pool
    labeled = al_simulation.select("random", 3, str(data))
    assert labeled[:4] == ids[:4] and len(set(labeled)) == 8
    assert all(c in ids[4:64] for c in labeled[4:])  # never a validation case (the last 16)
    saved = json.loads((tmp_path / "bundle" / "runs" / "al_random_s3" / "selection.json").read_text())
    assert saved["labeled"] == labeled and sorted(saved["scores"]) == sorted(ids[4:64])
    # the 4 highest random scores were picked
    assert sorted(saved["picked"]) == sorted(sorted(saved["scores"], key=saved["scores"].get)[-4:])
    saved["labeled"] = ids[:8]  # a finished selection is read back, not drawn again
    (tmp_path / "bundle" / "runs" / "al_random_s3" / "selection.json").write_text(json.dumps(saved))
    assert al_simulation.select("random", 3, str(data)) == ids[:8]
    assert al_simulation.select("random", 4, str(data)) != labeled  # the seed draws the choice


def test_a_committed_selection_is_read_back_on_a_machine_without_the_run_folders(pool, monkeypatch):
    ids, data = pool
    made = {"labeled": ids[:4] + ids[10:14], "picked": ids[10:14], "scores": {}}
    al_simulation.RESULTS.write_text(json.dumps({"selections": {"al_disagreement_s2": made}, "runs": []}))

    def no_training(*args):
        raise AssertionError("round 1 retrained although its selection is known")

    monkeypatch.setattr(la_cpu, "one_run", no_training)
    assert al_simulation.select("disagreement", 2, str(data)) == made["labeled"]
    # not committed, and round 1's model is missing: round 1 is trained first, then the cases are scored
    calls = []
    monkeypatch.setattr(la_cpu, "one_run", lambda *args: calls.append(args[:3]))
    monkeypatch.setattr(al_simulation, "scores", lambda strategy, seed, d, candidates: {c: float(c[4:]) for c in candidates})
    assert al_simulation.select("disagreement", 3, str(data))[4:] == ids[63:59:-1]
    assert calls == [("full", 5, 3)]
    assert al_simulation.select("random", 3, str(data)) and calls == [("full", 5, 3)]  # random needs no model


def test_next_ids_reuses_the_study_record_committed_by_la_cpu(tmp_path, monkeypatch):
    ids = [f"case{i:02d}" for i in range(80)]
    (tmp_path / "train.list").write_text("\n".join(ids) + "\n")
    monkeypatch.setattr(la_cpu, "BUNDLE", tmp_path / "bundle")
    monkeypatch.setattr(la_cpu, "RESULTS", tmp_path / "la_cpu.json")
    la_cpu.RESULTS.write_text(json.dumps({"runs": [{"run": "la_cpu_full_10pct_s2", "seed": 2, "x": 1}]}))
    monkeypatch.setattr(la_cpu, "one_run", lambda *args: pytest.fail("the study's committed run was retrained"))
    record = al_simulation.round2("next_ids", 2, str(tmp_path), threads=1)
    assert record["x"] == 1 and record["labeled"] == ids[:8] and record["strategy"] == "next_ids"


def test_round_one_is_retrained_until_it_has_finished_and_only_once_for_two_processes(pool, monkeypatch):
    ids, data = pool
    folder = al_simulation.round1_folder(2)
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "model.pt").write_bytes(b"best so far")  # a run killed mid-training has one
    calls = []

    def one_run(config, labels, seed, *rest):
        calls.append((config, labels, seed))
        time.sleep(0.3)  # long enough for the other caller to arrive while this one trains
        (folder / "record.json").write_text("{}")

    monkeypatch.setattr(la_cpu, "one_run", one_run)
    callers = [threading.Thread(target=al_simulation.train_round1, args=(2, str(data), 1)) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert calls == [("full", 5, 2)]  # resumed once, the second caller waited for it
    al_simulation.train_round1(2, str(data), 1)
    assert len(calls) == 1  # finished: never trained again


def _record(run, dice, seed):
    """A finished run's record: per-case Dice and the evaluation summary both checkpoints share."""
    cases = {f"c{i}": d for i, d in enumerate(dice)}
    mean = {m: {"mean": float(np.mean(dice))} for m in ("dice", "jaccard", "hd95_vox", "asd_vox")}
    evaluation = {"per_case_dice": cases, "metrics": {"ensemble": {"none": {"1": mean}}}}
    return {"run": run, "seed": seed, "curves": {"val_mean_dice": [[100, 0.5], [200, float(np.mean(dice))]]},
            "evaluation": {"final": evaluation, "best": evaluation}}


def test_collect_tables_round_two_against_random_with_round_one_for_reference(pool, tmp_path, monkeypatch):
    from scipy.stats import wilcoxon

    monkeypatch.setattr(la_cpu, "RESULTS", tmp_path / "la_cpu.json")  # no study records
    base = [0.60, 0.70, 0.75, 0.80, 0.85, 0.90]
    gain = {1337: [0.02, 0.03, -0.01, 0.04, 0.05, 0.01], 2: [0.01, -0.02, 0.03, 0.02, 0.00, 0.06]}
    runs = tmp_path / "bundle" / "runs"
    for seed, g in gain.items():
        for strategy, dice in (("random", base), ("disagreement", [b + x for b, x in zip(base, g)])):
            (runs / f"al_{strategy}_s{seed}").mkdir(parents=True)
            (runs / f"al_{strategy}_s{seed}" / "record.json").write_text(json.dumps(_record(f"al_{strategy}_s{seed}", dice, seed)))
    round1 = al_simulation.round1_folder(1337)  # seed 1337's round 1 is here; seed 2's only in the committed results
    round1.mkdir(parents=True)
    (round1 / "record.json").write_text(json.dumps(_record(round1.name, [0.5] * 6, 1337)))
    kept = _record("la_cpu_full_5pct_s2", [0.4] * 6, 2)
    al_simulation.RESULTS.write_text(json.dumps({"runs": [kept], "selections": {}}))

    al_simulation.collect(al_simulation.RESULTS)
    result = json.loads(al_simulation.RESULTS.read_text())
    dice = {(r["config"], r["checkpoint"]): r["dice"] for r in result["summary"]}
    assert dice[("round1", "final")]["per_seed"] == [0.5, 0.4]
    expected = [np.mean(base) + np.mean(gain[s]) for s in (1337, 2)]
    assert dice[("disagreement", "best")]["mean"] == pytest.approx(np.mean(expected))
    assert dice[("disagreement", "best")]["std"] == pytest.approx(np.std(expected, ddof=1))
    test, = [t for t in result["tests"] if t["checkpoint"] == "final"]
    assert (test["reference"], test["other"], test["pairs"]) == ("disagreement", "random", 12)
    assert test["gain_per_seed"] == {"1337": 2.33, "2": 1.67}  # disagreement minus random
    assert test["wilcoxon_p"] == pytest.approx(wilcoxon(gain[1337] + gain[2]).pvalue)
    assert (tmp_path / "al_simulation.png").stat().st_size > 10_000
    # collected again without the run folders: everything is read back from the results file
    for folder in runs.iterdir():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    al_simulation.collect(al_simulation.RESULTS)
    assert json.loads(al_simulation.RESULTS.read_text())["summary"] == result["summary"]


def test_agreement_of_two_strategies_by_hand():
    cases = [f"c{i}" for i in range(6)]
    made = {"al_disagreement_s2": {"scores": dict(zip(cases, [1, 2, 3, 4, 5, 6])), "picked": ["c5", "c4", "c3", "c2"]},
            "al_epistemic_s2": {"scores": dict(zip(cases, [6, 5, 4, 3, 1, 2])), "picked": ["c0", "c1", "c2", "c3"]},
            "al_random_s2": {"scores": dict(zip(cases, [1, 2, 3, 4, 5, 6])), "picked": ["c5", "c4", "c3", "c2"]}}
    rows = al_simulation.agreement(made)  # random is not compared: its scores are draws
    assert [(r["seed"], r["strategies"], r["shared_picks"]) for r in rows] == [(2, ["disagreement", "epistemic"], 2)]
    assert rows[0]["spearman"] == pytest.approx(1 - 6 * (25 + 9 + 1 + 1 + 16 + 16) / (6 * 35), abs=1e-3)  # -0.943
