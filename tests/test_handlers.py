"""The checkpoint handlers on their own: atomic saves, the non-finite guard, the validation record, resume."""

import errno
import logging
import os
import pickle

import pytest
import torch
from ignite.engine import Engine, Events

from conftest import save_on_gpu
from monai_dualssl import AtomicCheckpointSaver, ResumeHandler, ValidationState, latest_checkpoint, non_finite_entries


class Holder:
    """A checkpoint entry whose ``state_dict()`` is whatever ``state`` currently is."""

    def __init__(self, state=None):
        self.state = {} if state is None else state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def engine_and_net(seed=0):
    torch.manual_seed(seed)
    return Engine(lambda e, b: None), torch.nn.Linear(3, 2)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


# ---- non-finite values ---------------------------------------------------------------------------


def test_non_finite_entries_finds_nan_and_inf_at_any_depth():
    checkpoint = {
        "net": {"weight": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([1, 2])},
        "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([float("inf")])}}, "param_groups": [{"lr": 0.1}]},
        "random": {"cuda": [torch.zeros(2), (torch.tensor([-float("inf")]),)]},
        "counts": torch.tensor([3, 4]),  # integers are never non-finite
        "trainer": {"iteration": 4, "name": "x", "lr": float("nan")},  # plain numbers are not checked
        "fine": [torch.ones(2), {"b": torch.zeros(1, dtype=torch.float16)}],
    }
    assert non_finite_entries(checkpoint) == ["net", "optimizer", "random"]
    assert non_finite_entries({k: checkpoint[k] for k in ("counts", "trainer", "fine")}) == []


def test_a_non_finite_checkpoint_is_not_written_and_the_good_one_is_kept(tmp_path, caplog):
    """Epoch 2 diverges (a NaN momentum buffer), epoch 3 is finite again: epoch 2 is never written (the error
    names the file and the entry), epoch 1 is kept, and epoch 3 is written beside it."""
    engine, net = engine_and_net()
    optimizer = Holder({"state": {"momentum": torch.zeros(2)}})
    AtomicCheckpointSaver(str(tmp_path), {"trainer": engine, "net": net, "optimizer": optimizer},
                          save_interval=1, n_saved=1).attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: optimizer.state["state"].__setitem__(
        "momentum", torch.full((2,), float("nan") if e.state.epoch == 2 else 0.0)))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(names(tmp_path)))  # after the saver
    with caplog.at_level(logging.ERROR):
        engine.run([0, 1], max_epochs=3)
    assert seen == [["checkpoint_epoch=1.pt"], ["checkpoint_epoch=1.pt"], ["checkpoint_epoch=1.pt", "checkpoint_epoch=3.pt"]]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=3.pt"
    assert torch.load(tmp_path / "checkpoint_epoch=3.pt", weights_only=True)["trainer"]["iteration"] == 6
    assert str(tmp_path / "checkpoint_epoch=2.pt") in caplog.text and "['optimizer']" in caplog.text


# ---- atomic writes -------------------------------------------------------------------------------


def test_a_checkpoint_is_written_as_a_hidden_file_in_its_folder_then_renamed(tmp_path, monkeypatch):
    """While the bytes are written, the folder holds only a hidden temporary file named after the target
    (a rename within one folder is atomic; nothing globbing ``*.pt`` sees a partial file)."""
    engine, net = engine_and_net()
    AtomicCheckpointSaver(str(tmp_path), {"trainer": engine, "net": net}, save_final=True,
                          final_filename="final.pt").attach(engine)
    real_save, during = torch.save, []

    def observing_save(obj, f, *args, **kwargs):
        during.append(names(tmp_path))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", observing_save)
    engine.run([0, 1], max_epochs=1)
    (partial,), = during
    assert partial.startswith(".final.pt.") and not partial.endswith(".pt"), partial
    assert names(tmp_path) == ["final.pt"]
    assert torch.load(tmp_path / "final.pt", weights_only=True)["trainer"]["iteration"] == 2


class DiskFull:
    """An entry whose serialisation fails as a full disk would, half way through the file."""

    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_raises_its_error_and_leaves_the_previous_checkpoint_alone(tmp_path):
    engine, net = engine_and_net()
    extra = Holder({"ok": torch.zeros(1)})
    AtomicCheckpointSaver(str(tmp_path), {"trainer": engine, "net": net, "extra": extra},
                          save_interval=1, n_saved=1).attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: extra.state.__setitem__("disk", DiskFull()))
    with pytest.raises(OSError) as info:
        engine.run([0, 1], max_epochs=3)
    assert info.value.errno == errno.ENOSPC
    assert names(tmp_path) == ["checkpoint_epoch=1.pt"]  # no partial file left behind
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 2


# ---- finding the latest checkpoint ---------------------------------------------------------------


def test_latest_checkpoint_ignores_files_without_a_trainer_iteration(tmp_path):
    torch.save(torch.ones(3), tmp_path / "weights.pt")  # not a dict
    torch.save({"net": torch.zeros(1)}, tmp_path / "model.pt")  # no trainer entry
    torch.save([{"trainer": {"iteration": 9}}], tmp_path / "list.pt")
    torch.save({"trainer": {"lr": 0.1}}, tmp_path / "other.pt")  # a trainer entry without an iteration
    torch.save({"trainer": {"iteration": 0, "epoch": 0}}, tmp_path / "start.pt")  # saved before the first step
    (tmp_path / "folder.pt").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "start.pt"
    (tmp_path / "start.pt").unlink()
    assert latest_checkpoint(tmp_path) is None


def test_latest_checkpoint_skips_a_file_removed_while_it_looks(tmp_path, monkeypatch):
    """A saver may remove a replaced checkpoint between the listing and the reading of the folder."""
    torch.save({"trainer": {"iteration": 4}}, tmp_path / "old.pt")
    real_load = torch.load

    def load_after_removal(path, *args, **kwargs):
        if os.path.basename(path) == "old.pt":
            os.remove(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load_after_removal)
    assert latest_checkpoint(tmp_path) is None


def test_latest_checkpoint_never_runs_code_from_a_file(tmp_path):
    """Looking for a checkpoint loads weights only: a pickle that would run code is refused, not run."""
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"trainer": {"iteration": 1}, "payload": Payload()}, tmp_path / "evil.pt")
    try:
        latest_checkpoint(tmp_path)
    except pickle.UnpicklingError:
        pass  # refused loudly is fine; running it is not
    assert not marker.exists()


def test_a_checkpoint_written_on_a_gpu_is_found_and_resumed_on_a_cpu(tmp_path):
    engine, net = engine_and_net(seed=1)
    engine.run([0, 1], max_epochs=2)
    save_on_gpu({"trainer": engine.state_dict(), "net": net.state_dict()}, tmp_path / "gpu.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "gpu.pt"
    fresh, fresh_net = engine_and_net(seed=2)
    ResumeHandler(str(tmp_path), {"trainer": fresh, "net": fresh_net}, map_location="cpu").attach(fresh)
    started = []
    fresh.add_event_handler(Events.ITERATION_STARTED, lambda e: started.append(e.state.iteration))
    fresh.run([0, 1], max_epochs=3)
    assert started == [5, 6]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in fresh_net.state_dict().items())


# ---- resume --------------------------------------------------------------------------------------


def test_resume_handler_resumes_by_default_and_says_from_where(tmp_path, caplog):
    engine, net = engine_and_net()
    AtomicCheckpointSaver(str(tmp_path), {"trainer": engine, "net": net}, save_interval=1, n_saved=1).attach(engine)
    engine.run([0, 1], max_epochs=2)
    fresh, fresh_net = engine_and_net(seed=5)
    ResumeHandler(str(tmp_path), {"trainer": fresh, "net": fresh_net}).attach(fresh)
    with caplog.at_level(logging.INFO, logger="monai_dualssl"):
        fresh.run([0, 1], max_epochs=3)
    assert fresh.state.iteration == 6
    assert f"continuing from {tmp_path / 'checkpoint_epoch=2.pt'} at iteration 4" in caplog.text


def test_resume_messages_follow_the_package_logger(tmp_path, caplog):
    """Setting the level of the ``monai_dualssl`` logger silences the resume warning (it is not the root's)."""
    engine, net = engine_and_net()
    handler = ResumeHandler(str(tmp_path / "none"), {"trainer": engine, "net": net})
    package = logging.getLogger("monai_dualssl")
    level = package.level
    package.setLevel(logging.ERROR)
    try:
        with caplog.at_level(logging.INFO):
            handler(engine)
    finally:
        package.setLevel(level)
    assert "nothing to resume from" not in caplog.text
    with caplog.at_level(logging.INFO):
        handler(engine)
    assert "nothing to resume from" in caplog.text and str(tmp_path / "none") in caplog.text


def test_resume_handler_needs_the_trainer_entry():
    with pytest.raises(ValueError, match=r"must include 'trainer'.*\['net', 'optimizer'\]"):
        ResumeHandler("unused", {"optimizer": Holder(), "net": torch.nn.Linear(1, 1)})


# ---- the validation record -----------------------------------------------------------------------


def key_metric_saver(folder, net, filename="best.pt"):
    return AtomicCheckpointSaver(str(folder), {"net": net}, save_key_metric=True, key_metric_name="dice",
                                 key_metric_filename=filename)


def validate(evaluator, scores, saver):
    """One epoch of ``evaluator`` per score, recording its key metric and best as a MONAI evaluator does
    before ``saver`` (attached here) sees it."""

    def record(e):
        e.state.metrics = {"dice": scores[e.state.epoch - 1]}
        if scores[e.state.epoch - 1] > e.state.best_metric:
            e.state.best_metric, e.state.best_metric_epoch = scores[e.state.epoch - 1], e.state.epoch

    evaluator.add_event_handler(Events.EPOCH_COMPLETED, record)
    saver.attach(evaluator)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1
    evaluator.run([0], max_epochs=len(scores))


def test_validation_state_round_trip_keeps_the_best_model(tmp_path):
    """The record of a run whose best Dice was 0.8 at epoch 2, restored into a fresh evaluator and savers: a
    later 0.5 replaces neither the score nor best.pt; a saver without key metric has an empty record."""
    evaluator, net = engine_and_net()
    best, plain = key_metric_saver(tmp_path, net), AtomicCheckpointSaver(str(tmp_path / "plain"), {"net": net})
    validate(evaluator, [0.3, 0.8], best)
    state = ValidationState(evaluator, [best, plain]).state_dict()
    record = {"_saved": [(0.8, "net_key_metric=0.8000.pt")]}  # Ignite's name for the file written as best.pt
    assert state == {"best_metric": 0.8, "best_metric_epoch": 2, "savers": [record, {}]}
    kept = (tmp_path / "best.pt").read_bytes()

    fresh, other_net = engine_and_net(seed=3)
    fresh_best, fresh_plain = key_metric_saver(tmp_path, other_net), AtomicCheckpointSaver(str(tmp_path / "plain"), {"net": other_net})
    restored = ValidationState(fresh, [fresh_best, fresh_plain])
    restored.load_state_dict(state)
    assert (fresh.state.best_metric, fresh.state.best_metric_epoch) == (0.8, 2)
    fresh.add_event_handler(Events.STARTED, lambda e: restored.load_state_dict(state))  # as a resume does
    validate_later = [0.5]
    fresh.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(e.state, "metrics", {"dice": validate_later[0]}))
    fresh_best.attach(fresh)
    fresh.run([0], max_epochs=1)
    assert (fresh.state.best_metric, fresh.state.best_metric_epoch) == (0.8, 2)
    assert (tmp_path / "best.pt").read_bytes() == kept
    assert restored.state_dict()["savers"] == [record, {}]
