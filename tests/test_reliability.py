"""Nothing lost, nothing silently wrong: switches, overrides, run folders, resume, checkpoints, NaN."""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow

from conftest import CONFIGS, REPO, tiny_overrides
from monai_dualssl import ConfigError, NonFiniteLossError, RunConfig, as_bool, latest_checkpoint


def workflow(root: Path, dataset: Path, **extra) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=str(CONFIGS / "train.yaml"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **tiny_overrides(dataset, root, **extra),
    )


def run(wf: ConfigWorkflow, stop_after_epoch: int | None = None) -> ConfigWorkflow:
    """initialize + run; ``stop_after_epoch`` ends training there as a kill after that checkpoint would."""
    wf.initialize()
    if stop_after_epoch is not None:
        trainer = wf.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after_epoch), lambda e: e.terminate())
    wf.run()
    return wf


def cause_of(error: BaseException, kind: type) -> BaseException:
    """The first exception of type ``kind`` in the chain of ``error`` (MONAI wraps config errors)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no {kind.__name__} in the exception chain"
    return error


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def weights(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    return {f"{k}.{n}": t for k in ("network_a", "network_b") for n, t in state[k].items()}


@pytest.fixture(scope="module")
def la_like(tmp_path_factory) -> Path:
    """A tiny folder in the LA layout (train.list, <case>/mri_norm2.h5): 6 cases of 32^3."""
    root = tmp_path_factory.mktemp("la_like")
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"))
    for i in range(6):
        label = (np.linalg.norm(grid - rng.integers(12, 20, 3)[:, None, None, None], axis=0) < 7).astype(np.uint8)
        (root / f"case{i}").mkdir()
        with h5py.File(root / f"case{i}" / "mri_norm2.h5", "w") as f:
            f["image"] = (label + 0.3 * rng.standard_normal(label.shape)).astype(np.float32)
            f["label"] = label
    (root / "train.list").write_text("\n".join(f"case{i}" for i in range(6)) + "\n")
    return root


# ---- 1. command-line booleans -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), ("true", True), ("false", False), ("True", True), ("FALSE", False),
     ("1", True), ("0", False), (1, True), (0, False)],
)
def test_as_bool_accepts_the_usual_spellings(value, expected):
    assert as_bool(value, "resume") is expected


@pytest.mark.parametrize("value", ["flase", "", "2", 2, None, [True]])
def test_as_bool_rejects_anything_else_naming_the_key(value):
    with pytest.raises(ConfigError, match="'use_proto' must be a boolean"):
        as_bool(value, "use_proto")


def test_lowercase_false_switches_take_effect(tmp_path, tiny_dataset):
    wf = workflow(tmp_path, tiny_dataset, use_proto="false", kl_weighting="false", entropy_filter="0",
                  use_cos="False", detach_weight="true")
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.proto_loss is None and trainer.cos_loss is None
    assert trainer.cps_loss.kl_weighting is False and trainer.cps_loss.entropy_filter is False
    assert trainer.cps_loss.detach_weight is True


def test_cli_synthetic_false_never_writes_into_the_data_folder(tmp_path, la_like):
    """``--synthetic false`` with an LA folder trains on it and writes nothing into it."""
    before = snapshot(la_like)
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml")]
    overrides = tiny_overrides(la_like, tmp_path, num_labeled=2, num_val=2, max_iterations=2)
    overrides.update(synthetic="false", h5="true", resume="false", amp="false")
    for key, value in overrides.items():
        args += [f"--{key}", str(value) if not isinstance(value, (list, bool)) else repr(value)]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(la_like) == before
    assert torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "final.pt", weights_only=True)["trainer"]["iteration"] == 2


# ---- 6. overrides ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"max_iteration": 5}, "unknown key 'max_iteration'.*did you mean 'max_iterations'"),
        ({"keep_ratio": "abc"}, "'keep_ratio' must be a number, found 'abc'"),
        ({"epoch_length": "two"}, "'epoch_length' must be an integer, found 'two'"),
        ({"use_proto": "flase"}, "'use_proto' must be a boolean"),
        ({"amp_dtype": "half"}, "'amp_dtype' must be one of float16, bfloat16"),
        ({"filter_scope": "voxel"}, "'filter_scope' must be one of batch, class"),
        ({"max_iterations": 5, "epoch_length": 2}, r"max_iterations \(5\) must be a positive multiple of epoch_length \(2\)"),
        ({"max_iterations": 1, "epoch_length": 2}, r"max_iterations \(1\) must be a positive multiple"),
    ],
)
def test_bad_overrides_are_refused_before_anything_runs(tmp_path, tiny_dataset, extra, message):
    wf = workflow(tmp_path, tiny_dataset, **extra)
    with pytest.raises(Exception) as info:
        wf.initialize()
    assert re.search(message, str(cause_of(info.value, ConfigError)))
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_cli_error_is_the_last_thing_printed(tmp_path, tiny_dataset):
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
            "--bundle_root", str(tmp_path), "--synthetic", "false", "--dataset_dir", str(tiny_dataset),
            "--max_iteration", "5"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = [line for line in result.stderr.splitlines() if line.strip()][-2:]
    assert last[0].startswith("ConfigError: configuration problem(s):"), result.stderr[-2000:]
    assert "unknown key 'max_iteration'" in last[1] and "did you mean 'max_iterations'" in last[1]


# ---- 4. stale runs -----------------------------------------------------------------------------


def test_fresh_run_into_an_earlier_run_is_refused_unless_told(tmp_path, tiny_dataset):
    run(workflow(tmp_path, tiny_dataset))
    model = tmp_path / "models" / "model.pt"
    kept = model.read_bytes()
    with pytest.raises(Exception) as info:
        workflow(tmp_path, tiny_dataset).initialize()
    message = str(cause_of(info.value, ConfigError))
    assert str(tmp_path / "runs" / "demo") in message and "--resume True" in message and "--overwrite True" in message
    assert model.read_bytes() == kept
    old = tmp_path / "runs" / "demo" / "checkpoints" / "checkpoint_epoch=2.pt"
    assert old.is_file()
    wf = workflow(tmp_path, tiny_dataset, overwrite=True, max_iterations=2)
    wf.initialize()
    assert not old.exists()  # the earlier run's checkpoints are gone: resume cannot pick them up
    wf.run()
    assert torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "final.pt", weights_only=True)["trainer"]["iteration"] == 2


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path, tiny_dataset):
    run(workflow(tmp_path, tiny_dataset), stop_after_epoch=1)
    with pytest.raises(Exception) as info:
        run(workflow(tmp_path, tiny_dataset, resume=True, lr=0.5, keep_ratio=0.7))
    message = str(cause_of(info.value, ConfigError))
    assert "lr: checkpoint 0.05, now 0.5" in message and "keep_ratio: checkpoint 0.8, now 0.7" in message


def test_resume_accepts_a_checkpoint_holding_a_key_that_has_since_become_resumable():
    # a checkpoint written while eval_split (now resumable) was still part of the run's identity
    old = {"lr": 0.05, "eval_split": "validation", "num_workers": 4}
    state = {"config": json.dumps(old, sort_keys=True), "sha256": "written by an older version"}
    RunConfig({"lr": 0.05, "eval_split": "test", "num_workers": 0}).load_state_dict(state)
    RunConfig({"lr": 0.05}).load_state_dict(state)
    with pytest.raises(ConfigError) as info:
        RunConfig({"lr": 0.5, "eval_split": "validation"}).load_state_dict(state)
    assert "lr: checkpoint 0.05, now 0.5" in str(info.value) and "eval_split" not in str(info.value)


def _train_yaml() -> dict:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    return json.loads(json.dumps(parser.get(), default=str))


def _older(**running) -> tuple[dict, dict]:
    """A checkpoint state of train.yaml before filter_scope existed (and with one workflow step fewer), written as
    MONAI's workflow spells references (a::b), and the running train.yaml with ``running`` set (a#b paths)."""
    old = _train_yaml()
    del old["filter_scope"], old["train"]["cps_loss"]["filter_scope"], old["train"]["proto_loss"]["filter_scope"]
    old["initialize"] = old["initialize"][:-1]
    now = _train_yaml()
    for path, value in running.items():
        *parents, leaf = path.split("__")
        section = now
        for name in parents:
            section = section[name]
        section[leaf] = value
    return {"config": json.dumps(old, sort_keys=True).replace("#", "::"), "sha256": "an older version"}, now


def test_resume_accepts_a_checkpoint_of_an_older_bundle_version_and_names_the_differences(caplog):
    state, now = _older(filter_scope="batch")  # resumed with --filter_scope batch, the behaviour before it existed
    with caplog.at_level(logging.WARNING):
        RunConfig(now).load_state_dict(state)
    assert "filter_scope: checkpoint <not set>, now 'batch'" in caplog.text
    assert "train#cps_loss#filter_scope: checkpoint <not set>, now '@filter_scope'" in caplog.text  # wiring
    assert "initialize: checkpoint [" in caplog.text  # the workflow's steps differ: named, not refused
    caplog.clear()
    same = RunConfig(_train_yaml()).state_dict()
    with caplog.at_level(logging.WARNING):
        RunConfig(_train_yaml()).load_state_dict(same)
        RunConfig(_train_yaml()).load_state_dict({**same, "sha256": "another hash"})  # compared value by value
    assert not caplog.text  # the same configuration: nothing to say


@pytest.mark.parametrize("running, message", [
    # a setting added since, set to anything but what runs before it did: the method would change
    # (train.yaml's default is now 'class')
    ({}, "filter_scope: checkpoint <not set>, now 'class' (runs written before filter_scope existed used 'batch')"),
    # a new argument given on the command line (--train#optimizer_a#nesterov True)
    ({"train__optimizer_a__nesterov": True}, "train#optimizer_a#nesterov: checkpoint <not set>, now True"),
    # a section replaced by a value: the value is new, the section's entries are gone
    ({"train__lr_scheduler_a": "$None"}, "train#lr_scheduler_a: checkpoint <not set>, now '$None'"),
])
def test_resume_refuses_keys_that_change_the_run(running, message):
    state, now = _older(**running)
    with pytest.raises(ConfigError) as info:
        RunConfig(now).load_state_dict(state)
    assert message in str(info.value)


def test_resume_refuses_a_setting_the_running_configuration_no_longer_has():
    state = RunConfig(_train_yaml()).state_dict()
    now = _train_yaml()
    del now["keep_ratio"]
    with pytest.raises(ConfigError) as info:
        RunConfig(now).load_state_dict(state)
    assert "keep_ratio: checkpoint 0.8, now <not set>" in str(info.value)


def test_resume_refuses_a_changed_value_inside_a_section():
    state = RunConfig(_train_yaml()).state_dict()
    changed = _train_yaml()
    changed["train"]["cps_loss"]["keep_ratio"] = 0.5  # --train#cps_loss#keep_ratio 0.5
    with pytest.raises(ConfigError) as info:
        RunConfig(changed).load_state_dict(state)
    assert "train#cps_loss#keep_ratio: checkpoint '@keep_ratio', now 0.5" in str(info.value)


def test_resume_with_nothing_to_resume_from_warns(tmp_path, tiny_dataset, caplog):
    with caplog.at_level(logging.WARNING):
        wf = run(workflow(tmp_path, tiny_dataset, resume="true", max_iterations=2))
    assert "nothing to resume from" in caplog.text and str(tmp_path / "runs" / "demo" / "checkpoints") in caplog.text
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 2


# ---- 2. resume continues as if never stopped ---------------------------------------------------


def test_resume_keeps_the_best_model_and_score(tmp_path, tiny_dataset):
    run(workflow(tmp_path, tiny_dataset, max_iterations=6, val_interval=2), stop_after_epoch=1)
    ckpt = latest_checkpoint(tmp_path / "runs" / "demo" / "checkpoints")
    state = torch.load(ckpt, weights_only=True)
    assert state["validation"]["best_metric_epoch"] == 1 and len(state["validation"]["savers"]) == 2
    # an earlier best no later validation of this tiny run can reach
    state["validation"]["best_metric"] = 1.0
    for record in state["validation"]["savers"]:
        record["_saved"] = [(1.0, name) for _, name in record["_saved"]]
    torch.save(state, ckpt)
    files = [tmp_path / "models" / "model.pt", tmp_path / "runs" / "demo" / "best.pt"]
    kept = [f.read_bytes() for f in files]
    wf = run(workflow(tmp_path, tiny_dataset, max_iterations=6, val_interval=2, resume=True))
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.best_metric == 1.0 and evaluator.state.best_metric_epoch == 1
    assert [f.read_bytes() for f in files] == kept


@pytest.mark.parametrize("num_workers", [0, 2])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny_dataset, num_workers):
    """6 iterations, epochs of 3 over passes of 2 batches, random flips and rotations, dropout, with and
    without data-loader worker processes."""
    settings = dict(max_iterations=6, epoch_length=3, val_interval=3, flip_prob=0.5, rotate_prob=0.5, dropout=0.3,
                    num_workers=num_workers)
    run(workflow(tmp_path / "whole", tiny_dataset, **settings))
    run(workflow(tmp_path / "parts", tiny_dataset, **settings), stop_after_epoch=1)
    run(workflow(tmp_path / "parts", tiny_dataset, resume=True, **settings))
    whole = weights(tmp_path / "whole" / "runs" / "demo" / "checkpoints" / "final.pt")
    parts = weights(tmp_path / "parts" / "runs" / "demo" / "checkpoints" / "final.pt")
    assert whole.keys() == parts.keys()
    different = [k for k in whole if not torch.equal(whole[k], parts[k])]
    assert not different, different[:5]


# ---- 5. NaN ------------------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_and_no_checkpoint_holds_it(tmp_path, tiny_dataset):
    wf = workflow(tmp_path, tiny_dataset, lr=1e6, max_iterations=20, val_interval=2)
    with pytest.raises(Exception) as info:
        run(wf)
    message = str(cause_of(info.value, NonFiniteLossError))
    assert "non-finite at iteration" in message and "= nan" in message.lower() or "= inf" in message.lower()
    iteration = wf.parser.get_parsed_content("train#trainer").state.iteration
    assert iteration < 20
    for path in sorted(tmp_path.rglob("*.pt")):
        state = torch.load(path, weights_only=True)
        tensors = [t for v in state.values() if isinstance(v, dict) for t in v.values() if isinstance(t, torch.Tensor)]
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path


# ---- 3. a kill during a checkpoint save --------------------------------------------------------

KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from monai_dualssl import AtomicCheckpointSaver
    from ignite.engine import Engine

    folder = sys.argv[1]
    engine = Engine(lambda e, b: None)
    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(folder, {"trainer": engine, "net": net}, save_interval=1, n_saved=1,
                                  save_final=True, final_filename="final.pt")
    saver.attach(engine)
    real_save, calls = torch.save, []

    def save_then_die(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the 2nd epoch's checkpoint is half written, then the process dies
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, *args, **kwargs)

    torch.save = save_then_die
    engine.run([0, 1], max_epochs=3)
    """
)


def test_a_kill_during_a_checkpoint_save_leaves_a_loadable_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_SAVE)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -9, result.stderr[-2000:]
    latest = latest_checkpoint(tmp_path / "ckpt")
    assert latest is not None and latest.name == "checkpoint_epoch=1.pt"
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["checkpoint_epoch=1.pt"]


def test_replaced_checkpoints_are_removed_once_the_new_one_is_written(tmp_path):
    from ignite.engine import Engine
    from monai_dualssl import AtomicCheckpointSaver

    engine, net = Engine(lambda e, b: None), torch.nn.Linear(2, 2)
    AtomicCheckpointSaver(str(tmp_path), {"trainer": engine, "net": net}, save_interval=1, n_saved=1).attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]
