"""The study drivers' runner (benchmarks/la_cpu.py's ``timed``, shared by acdc_cpu.py and al_simulation.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import la_cpu  # noqa: E402


def say(text):
    return [sys.executable, "-c", f"print({text!r})"]


def test_a_resumed_training_adds_to_its_log_and_a_fresh_command_replaces_it(tmp_path):
    log = tmp_path / "train.log"
    for leg in ("first leg", "second leg"):  # a run killed after its first leg, then resumed
        la_cpu.timed(say(leg), log, threads=None, append=True)
    assert log.read_text() == "first leg\nsecond leg\n"
    la_cpu.timed(say("evaluation"), log, threads=None)
    assert log.read_text() == "evaluation\n"


def test_the_runner_sets_the_threads_and_fails_loudly(tmp_path):
    log = tmp_path / "run.log"
    seconds = la_cpu.timed([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"], log, threads=3)
    assert log.read_text() == "3\n" and seconds > 0
    with pytest.raises(subprocess.CalledProcessError):
        la_cpu.timed([sys.executable, "-c", "raise SystemExit(2)"], log, threads=None)


def test_commands_and_results_name_no_machine_path(tmp_path):
    run = la_cpu.BUNDLE / "runs" / "x"
    args = la_cpu.command("evaluating", ["bundle/configs/train.yaml"], "/data/la", "x",
                          {"ckpt_path": run / "models" / "model.pt", "eval_dir": tmp_path, "lr": 0.5})
    assert args[args.index("--ckpt_path") + 1] == "bundle/runs/x/models/model.pt"  # relative to the runs' cwd
    assert args[args.index("--eval_dir") + 1] == str(tmp_path) and args[args.index("--lr") + 1] == "0.5"
    text = la_cpu.records_json({"runs": [{"command": f"python x --ckpt_path {run}/models/model.pt"}]})
    assert str(la_cpu.REPO) not in text and "--ckpt_path bundle/runs/x/models/model.pt" in text
    # a run made in another checkout: its paths into bundle/ lose the checkout's path; other text is kept
    text = la_cpu.records_json({"c": "x --ckpt_path /elsewhere/co/bundle/runs/y/m.pt --eval_dir /tmp/e ['bundle/configs/a.yaml']",
                                "d": "/other/bundle/runs/z"})
    assert json.loads(text) == {"c": "x --ckpt_path bundle/runs/y/m.pt --eval_dir /tmp/e ['bundle/configs/a.yaml']",
                                "d": "bundle/runs/z"}


def test_curves_keep_the_later_value_of_a_step_logged_again_after_a_resume(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path)) as first_leg:
        for step in (25, 50, 75):
            first_leg.add_scalar("kl_w_mean", step / 100, step)
        first_leg.add_scalar("val_mean_dice", 0.5, 1)
    with SummaryWriter(log_dir=str(tmp_path)) as resumed:  # resumed from the checkpoint at step 50
        for step in (75, 100):
            resumed.add_scalar("kl_w_mean", step / 100 + 0.01, step)
        resumed.add_scalar("val_mean_dice", 0.6, 2)
    curves = la_cpu.curves(tmp_path, epoch_length=50)
    assert curves == {"kl_w_mean": [[25, 0.25], [50, 0.5], [75, 0.76], [100, 1.01]], "val_mean_dice": [[50, 0.5], [100, 0.6]]}


def test_the_study_resumes_from_its_committed_results_and_collect_keeps_them(tmp_path, monkeypatch):
    """A machine with none of the earlier run folders: the runs in the committed JSON are not redone, and
    collecting adds the runs finished here to them (a run finished here replaces a kept one of its name)."""
    monkeypatch.setattr(la_cpu, "BUNDLE", tmp_path / "bundle")
    monkeypatch.setattr(la_cpu, "RESULTS", tmp_path / "la_cpu.json")
    kept = [{"run": la_cpu.run_name("full", 10, s), "v": "kept"} for s in (1337, 2)]
    la_cpu.RESULTS.write_text(json.dumps({"runs": kept}))
    here = tmp_path / "bundle" / "runs" / la_cpu.run_name("full", 10, 2)
    here.mkdir(parents=True)
    (here / "record.json").write_text(json.dumps({"run": here.name, "v": "new"}))
    records = la_cpu.finished(la_cpu.RESULTS)
    assert {name: r["v"] for name, r in records.items()} == {"la_cpu_full_10pct_s1337": "kept", "la_cpu_full_10pct_s2": "new"}
    trained = []
    monkeypatch.setattr(la_cpu, "one_run", lambda c, l, s, *a: trained.append((c, l, s)) or {"run": "", "train_wall_seconds": 0, "iterations": 0})
    monkeypatch.setattr(sys, "argv", ["la_cpu.py", "--dataset_dir", "d", "--configs", "full", "--seeds", "1337", "2", "3"])
    la_cpu.main()
    assert trained == [("full", 10, 3)]


def test_paired_tests_by_hand():
    """Two seeds of 6 cases: the pooled test over 12 pairs, the gain per seed, the test over the seed-averaged cases."""
    from scipy.stats import wilcoxon

    gain = {1337: [0.01, 0.02, 0.03, 0.04, 0.05, -0.06], 2: [0.03, -0.01, 0.02, 0.01, 0.02, -0.002]}
    base = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9]

    def record(config, seed, dice):
        cases = {f"c{i}": d for i, d in enumerate(dice)}
        return {"config": config, "labels_percent": 10, "seed": seed,
                "evaluation": {w: {"per_case_dice": cases} for w in ("final", "best")}}

    records = [record("supervised", s, base) for s in gain] + [
        record("full", s, [b + g for b, g in zip(base, gain[s])]) for s in gain]
    final = [t for t in la_cpu.paired_tests(records) if t["checkpoint"] == "final"]
    assert len(final) == 1 and final[0]["other"] == "supervised" and final[0]["pairs"] == 12
    assert final[0]["gain_per_seed"] == {"1337": 1.5, "2": 1.13}
    assert final[0]["mean_gain_dice_points"] == 1.32
    assert final[0]["wilcoxon_p"] == pytest.approx(wilcoxon(gain[1337] + gain[2]).pvalue)
    averaged = [(x + y) / 2 for x, y in zip(gain[1337], gain[2])]
    assert final[0]["cases"] == 6 and final[0]["case_mean_wilcoxon_p"] == pytest.approx(wilcoxon(averaged).pvalue)
    # restricted to some configurations: only those are tested against the reference
    records += [record("no_kl", s, base) for s in gain]
    assert {t["other"] for t in la_cpu.paired_tests(records)} == {"supervised", "no_kl"}
    assert {t["other"] for t in la_cpu.paired_tests(records, "full", ("no_kl",))} == {"no_kl"}
