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


def _record(run, seed, final, best=None):
    """A finished run's record: per-case Dice and the evaluation summary of each checkpoint (best: final + 0.01
    unless given)."""
    def evaluation(dice):
        mean = {m: {"mean": float(np.mean(dice))} for m in ("dice", "jaccard", "hd95_vox", "asd_vox")}
        return {"per_case_dice": {f"c{i}": d for i, d in enumerate(dice)}, "metrics": {"ensemble": {"none": {"1": mean}}}}

    best = [d + 0.01 for d in final] if best is None else best
    return {"run": run, "seed": seed, "curves": {"val_mean_dice": [[100, 0.5], [200, float(np.mean(final))]]},
            "evaluation": {"final": evaluation(final), "best": evaluation(best)}}


def _write(folder: Path, record: dict, selection: dict | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "record.json").write_text(json.dumps(record))
    if selection:
        (folder / "selection.json").write_text(json.dumps(selection))


def test_collect_tables_round_two_against_random_with_round_one_for_reference(pool, tmp_path, monkeypatch):
    from scipy.stats import wilcoxon

    ids, _ = pool
    base = {1337: [0.60, 0.70, 0.75, 0.80, 0.85, 0.90], 2: [0.55, 0.72, 0.70, 0.81, 0.80, 0.92]}
    gain = {1337: [0.02, 0.03, -0.01, 0.04, 0.05, 0.01], 2: [0.01, -0.02, 0.03, 0.02, 0.00, 0.06]}
    runs = tmp_path / "bundle" / "runs"
    for seed in gain:
        _write(runs / f"al_random_s{seed}", _record(f"al_random_s{seed}", seed, base[seed]))
        final, best = ([b + k * g + k / 200 for b, g in zip(base[seed], gain[seed])] for k in (1, 2))  # best: twice the gain
        _write(runs / f"al_disagreement_s{seed}", _record(f"al_disagreement_s{seed}", seed, final, best),
               {"labeled": ids[:8], "picked": ids[4:8], "scores": {c: float(i) for i, c in enumerate(ids[4:64])}})
    _write(runs / "al_expected_dice_s1337", _record("al_expected_dice_s1337", 1337, base[1337]),
           {"labeled": ids[:6] + ids[10:12], "picked": ids[4:6] + ids[10:12], "scores": {c: float(i % 7) for i, c in enumerate(ids[4:64])}})
    _write(al_simulation.round1_folder(1337), _record("la_cpu_full_5pct_s1337", 1337, [0.5] * 6))  # seed 2's: committed only
    committed = [_record("la_cpu_full_5pct_s1337", 1337, [0.2] * 6), _record("la_cpu_full_5pct_s2", 2, [0.4] * 6),
                 _record("la_cpu_full_10pct_s1337", 1337, [0.1] * 6)]  # a stale copy of the study's next_ids run
    al_simulation.RESULTS.write_text(json.dumps({"runs": committed, "selections": {}}))
    monkeypatch.setattr(la_cpu, "RESULTS", tmp_path / "la_cpu.json")  # the study's own record of next_ids comes first
    la_cpu.RESULTS.write_text(json.dumps({"runs": [_record("la_cpu_full_10pct_s1337", 1337, [0.7] * 6)]}))

    al_simulation.collect(al_simulation.RESULTS)
    result = json.loads(al_simulation.RESULTS.read_text())
    dice = {(r["config"], r["checkpoint"]): r["dice"] for r in result["summary"]}
    assert dice[("round1", "final")]["per_seed"] == [0.5, 0.4]  # the run folder's round 1 before the kept copy
    assert dice[("next_ids", "final")]["per_seed"] == [0.7]  # the study's record before the stale copy
    expected = [np.mean(base[s]) + np.mean(gain[s]) + 0.005 for s in (1337, 2)]
    assert dice[("disagreement", "final")]["mean"] == pytest.approx(np.mean(expected))
    assert dice[("disagreement", "final")]["std"] == pytest.approx(np.std(expected, ddof=1))
    test, best = [t for t in result["tests"] if t["reference"] == "disagreement"]
    assert (test["checkpoint"], test["other"], test["pairs"]) == ("final", "random", 12)
    assert test["gain_per_seed"] == {"1337": 2.83, "2": 2.17}  # disagreement minus random of the same seed
    assert test["wilcoxon_p"] == pytest.approx(wilcoxon([g + 0.005 for g in gain[1337] + gain[2]]).pvalue)
    assert best["checkpoint"] == "best" and best["gain_per_seed"] == {"1337": 4.67, "2": 3.33}
    assert sorted(result["selections"]) == ["al_disagreement_s1337", "al_disagreement_s2", "al_expected_dice_s1337"]
    assert [(a["seed"], a["strategies"], a["shared_picks"]) for a in result["agreement"]] == [
        (1337, ["disagreement", "expected_dice"], 2)]
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
    epistemic = dict(reversed(list(zip(cases, [6, 5, 4, 3, 1, 2]))))  # another key order: paired by case
    made = {"al_disagreement_s2": {"scores": dict(zip(cases, [1, 2, 3, 4, 5, 100])), "picked": ["c5", "c4", "c3", "c2"]},
            "al_epistemic_s2": {"scores": epistemic, "picked": ["c0", "c1", "c2", "c3"]},
            "al_random_s2": {"scores": dict(zip(cases, [1, 2, 3, 4, 5, 6])), "picked": ["c5", "c4", "c3", "c2"]}}
    rows = al_simulation.agreement(made)  # random is not compared: its scores are draws
    assert [(r["seed"], r["strategies"], r["shared_picks"]) for r in rows] == [(2, ["disagreement", "epistemic"], 2)]
    # rank correlation (Pearson's would be -0.42 with the outlier 100): rank differences 5, 3, 1, 1, 4, 4
    assert rows[0]["spearman"] == pytest.approx(1 - 6 * (25 + 9 + 1 + 1 + 16 + 16) / (6 * 35), abs=1e-3)  # -0.943


def test_case_spread_by_hand():
    def run(strategy, dice, which="final"):
        other = "best" if which == "final" else "final"
        return {"strategy": strategy, "evaluation": {which: {"per_case_dice": dict(zip("abcd", dice))},
                                                     other: {"per_case_dice": dict(zip("abcd", [0.0] * 4))}}}

    records = [run("random", [0.9, 0.5, 0.8, 0.7]), run("random", [0.6, 0.9, 0.3, 0.8]),
               run("disagreement", [0.85, 0.75, 0.8, 0.9])]
    spread = {r["strategy"]: r for r in al_simulation.case_spread(records)}
    assert list(spread) == ["random", "disagreement"]
    assert spread["random"]["worst_case_dice"] == {"mean": pytest.approx(0.4), "per_seed": [0.5, 0.3]}
    assert spread["random"]["median_case_dice"] == {"mean": pytest.approx(0.725), "per_seed": [0.75, 0.7]}
    assert spread["disagreement"]["seeds"] == 1 and spread["disagreement"]["worst_case_dice"]["mean"] == pytest.approx(0.75)
    best = al_simulation.case_spread([run("random", [0.2, 0.4, 0.6, 0.8], "best")], "best")[0]
    assert best["checkpoint"] == "best" and best["median_case_dice"]["mean"] == pytest.approx(0.5)
