"""The dual trainer, its handlers and train.yaml end to end on tiny generated data."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.engines.utils import IterationEvents

from conftest import CONFIGS, REPO, tiny_overrides
from monai_dualssl import (
    AtomicCheckpointSaver,
    CosineConsistencyLoss,
    CrossConsistencyLoss,
    DualNet,
    DualSSLTrainer,
    PrototypeContrastiveLoss,
    RampUpHandler,
    SupervisedLoss,
    ResumeHandler,
    latest_checkpoint,
)


def make_trainer(semi=True, **kwargs):
    torch.manual_seed(0)
    net = DualNet(n_filters=4, resnet_blocks=(1, 1, 1, 1), vnet_stages=(1, 1, 1, 1, 1), proj_dim=8)
    labeled = [{"image": torch.randn(2, 1, 16, 16, 16), "label": (torch.rand(2, 1, 16, 16, 16) > 0.5).long()}] * 2
    unlabeled = [{"image": torch.randn(1, 1, 16, 16, 16)}] * 3 if semi else None
    trainer = DualSSLTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=labeled,
        unlabeled_data_loader=unlabeled,
        network_a=net.net_a,
        network_b=net.net_b,
        optimizer_a=torch.optim.SGD(net.net_a.parameters(), lr=0.01),
        optimizer_b=torch.optim.SGD(net.net_b.parameters(), lr=0.01),
        supervised_loss=SupervisedLoss(),
        cps_loss=CrossConsistencyLoss(),
        proto_loss=PrototypeContrastiveLoss(min_samples=4),
        cos_loss=CosineConsistencyLoss(),
        **kwargs,
    )
    return trainer, net


def test_trainer_iteration_fires_events_and_reports_terms():
    trainer, net = make_trainer()
    fired = []
    for event in IterationEvents:
        trainer.add_event_handler(event, lambda e, ev=event: fired.append(ev))
    before = {k: p.clone() for k, p in net.named_parameters()}
    trainer.run()
    assert fired[:4] == [IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                         IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED]
    out = trainer.state.output
    for key in ("loss", "ce_a", "dice_a", "corr_a", "ce_b", "dice_b", "corr_b", "loss_cps", "loss_proto", "loss_cos",
                "w_cps", "w_proto", "w_cos", "lr_a", "lr_b"):
        assert key in out, key
    assert out["pred"].shape == (2, 2, 16, 16, 16)
    assert torch.allclose(out["pred"].sum(1), torch.ones(1))
    # every weight of both networks moved (biases before BatchNorm get no gradient; the projection
    # head only learns once an untrained net predicts more than one class)
    unchanged = [k for k, p in net.named_parameters() if torch.equal(before[k], p)]
    assert not [k for k in unchanged if k.endswith("weight") and ".proj." not in k]


def test_supervised_only_trains_without_unlabeled_terms():
    trainer, _ = make_trainer(semi=False)
    trainer.run()
    assert "loss_cps" not in trainer.state.output and "loss_proto" not in trainer.state.output


def test_unlabeled_loader_is_cycled():
    trainer, _ = make_trainer(epoch_length=7)  # 7 unlabeled batches from a loader of 3
    seen = []
    original = trainer._next_unlabeled
    trainer._next_unlabeled = lambda: seen.append(1) or original()
    trainer.run()
    assert len(seen) == 7


def test_zero_weight_skips_term_and_rampup_sets_weights():
    trainer, _ = make_trainer(loss_weights={"proto": 0.0, "cos": 0.0})
    ramp = RampUpHandler({"cps": 2.0}, rampup_length=4)
    ramp.attach(trainer)
    trainer.run()
    out = trainer.state.output
    assert "loss_proto" not in out and "loss_cos" not in out
    assert trainer.state.loss_weights["cps"] == pytest.approx(2.0 * torch.exp(torch.tensor(-5 * 0.75**2)).item())


def test_trainer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="proto_on"):
        make_trainer(proto_on="stronger")
    with pytest.raises(ValueError, match="unknown keys"):
        make_trainer(loss_weights={"kl": 1.0})


def test_checkpoints_are_atomic_and_latest_is_found(tmp_path):
    trainer, net = make_trainer(epoch_length=2)
    trainer.state.max_epochs = 2
    saver = AtomicCheckpointSaver(str(tmp_path), {"trainer": trainer, "net": net}, save_interval=1, n_saved=2)
    assert saver._interval_checkpoint.save_handler._atomic
    saver.attach(trainer)
    trainer.run()
    assert latest_checkpoint(tmp_path).name.endswith("epoch=2.pt")
    files = sorted(p.name for p in tmp_path.iterdir())  # written via a temporary file: none left behind
    assert files == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"], files
    assert [torch.load(tmp_path / f, weights_only=True)["trainer"]["iteration"] for f in files] == [2, 4]
    (tmp_path / "empty").mkdir()
    assert latest_checkpoint(tmp_path / "empty") is None


def workflow(tmp_path, dataset, **extra):
    return ConfigWorkflow(
        config_file=str(CONFIGS / "train.yaml"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        **tiny_overrides(dataset, tmp_path, **extra),
    )


def test_train_yaml_config_workflow(tmp_path, tiny_dataset):
    wf = workflow(tmp_path, tiny_dataset)
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 4
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert 0 <= evaluator.state.best_metric <= 1 and evaluator.state.best_metric_epoch > 0  # validation ran
    wf.finalize()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert all(k.startswith(("net_a.", "net_b.")) for k in state)  # a plain state_dict of network_def
    final = torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4
    assert {"network_a", "network_b", "optimizer_a", "optimizer_b", "lr_scheduler_a"} <= set(final)


def test_supervised_override_does_not_build_unlabeled_data(tmp_path, tiny_dataset):
    wf = workflow(tmp_path, tiny_dataset, **{"train#trainer#unlabeled_data_loader": None})
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.unlabeled_data_loader is None and "loss_cps" not in trainer.state.output
    assert "train#unlabeled_dataset" not in wf.parser.ref_resolver.resolved_content


def bundle_cmd(tmp_path, dataset, *extra):
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml")]
    for key, value in tiny_overrides(dataset, tmp_path, max_iterations=12, val_interval=100).items():
        args += [f"--{key}", str(value) if not isinstance(value, (list, bool)) else repr(value)]
    return args + list(extra)


# runs train.yaml as the command line does and kills itself (SIGKILL) right after the checkpoint of epoch 2
KILLED_RUN = """
import os, signal, sys
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

config_file, overrides = sys.argv[1], eval(sys.argv[2])
wf = ConfigWorkflow(config_file=config_file, workflow_type="train", **overrides)
wf.initialize()
trainer = wf.parser.get_parsed_content("train#trainer")
die = lambda engine: os.kill(os.getpid(), signal.SIGKILL)
# registered when the run starts, i.e. after the checkpointer: it fires once that checkpoint is on disk
trainer.add_event_handler(Events.STARTED, lambda e: e.add_event_handler(Events.EPOCH_COMPLETED(once=2), die))
wf.run()
"""


def test_kill_and_resume(tmp_path, tiny_dataset):
    """SIGKILL after the checkpoint of iteration 4, restart with --resume True from another directory:
    the end state equals the uninterrupted run's, bit for bit."""
    overrides = tiny_overrides(tiny_dataset, tmp_path / "killed", max_iterations=12, val_interval=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    killed = subprocess.run([sys.executable, str(script), str(CONFIGS / "train.yaml"), repr(overrides)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt_dir = tmp_path / "killed" / "runs" / "demo" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_epoch=2.pt"]
    assert torch.load(ckpt_dir / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["iteration"] == 4
    result = subprocess.run(bundle_cmd(tmp_path / "killed", tiny_dataset, "--resume", "True"), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from" in result.stderr + result.stdout and "iteration 4" in result.stderr + result.stdout
    for path in ckpt_dir.iterdir():  # every file is a complete checkpoint, no temporary leftovers
        assert path.suffix == ".pt" and torch.load(path, weights_only=True)["trainer"]["iteration"] > 0
    final = torch.load(ckpt_dir / "final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 12 and final["lr_scheduler_a"]["last_epoch"] == 12
    whole = tmp_path / "whole"
    wf = workflow(whole, tiny_dataset, max_iterations=12, val_interval=100)
    wf.initialize()
    wf.run()
    expected = torch.load(whole / "runs" / "demo" / "checkpoints" / "final.pt", weights_only=True)
    for net in ("network_a", "network_b"):
        assert all(torch.equal(expected[net][k], v) for k, v in final[net].items()), net


# train.yaml + multi_gpu_train.yaml in one torchrun process; records what the rank's samplers gave each pass
DDP_RUN = """
import os, sys, torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

configs, overrides, out = eval(sys.argv[1]), eval(sys.argv[2]), sys.argv[3]
wf = ConfigWorkflow(config_file=configs, workflow_type="train", **overrides)
wf.initialize()
trainer = wf.parser.get_parsed_content("train#trainer")
seen = {"labeled": {}, "unlabeled": {}}
def record(engine):
    for name, stream in (("labeled", engine.data_loader), ("unlabeled", engine._unlabeled)):
        seen[name][stream.passes] = list(stream.loader.sampler)
trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
wf.run()
seen["validation"] = list(wf.parser.get_parsed_content("validate#dataloader").sampler)
params = {f"{n}.{k}": v for n, net in (("a", trainer.network_a), ("b", trainer.network_b)) for k, v in net.named_parameters()}
torch.save({"seen": seen, "params": params, "iteration": trainer.state.iteration}, f"{out}/rank{os.environ['RANK']}.pt")
wf.finalize()
"""


def test_ddp_two_processes_gloo(tmp_path, tiny_dataset):
    """multi_gpu_train.yaml under torchrun, 2 CPU processes (gloo): the ranks draw disjoint shares of every
    loader and end with identical weights; checkpoints come from rank 0 only."""
    configs = [str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml")]
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN)
    overrides = tiny_overrides(tiny_dataset, tmp_path, max_iterations=4)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            str(script), repr(configs), repr(overrides), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["iteration"] for r in ranks] == [4, 4]
    for name in ("labeled", "unlabeled"):  # 2 cases each: one per rank, every pass reshuffled
        assert ranks[0]["seen"][name].keys() == ranks[1]["seen"][name].keys() and len(ranks[0]["seen"][name]) >= 2
        for p in ranks[0]["seen"][name]:
            assert sorted(ranks[0]["seen"][name][p] + ranks[1]["seen"][name][p]) == [0, 1], (name, p)
    assert sorted(ranks[0]["seen"]["validation"] + ranks[1]["seen"]["validation"]) == [0, 1]
    different = [k for k, v in ranks[0]["params"].items() if not torch.equal(v, ranks[1]["params"][k])]
    assert not different, different[:5]
    final = torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4
    assert not any(k.startswith("module.") for k in final["network_a"])  # plain network weights, not DDP's
    assert all(torch.equal(final["network_a"][k[2:]], v) for k, v in ranks[0]["params"].items() if k.startswith("a."))
    assert (tmp_path / "models" / "model.pt").is_file()


def test_input_transform_b_only_changes_network_b_input():
    seen = {}
    trainer, net = make_trainer(input_transform_b=lambda x: x + 100.0)
    for name in ("net_a", "net_b"):
        getattr(net, name).encoder.register_forward_pre_hook(lambda m, args, n=name: seen.__setitem__(n, args[0].detach()))
    trainer.run()
    assert torch.allclose(seen["net_b"], seen["net_a"] + 100.0)


class Recorder(torch.nn.Module):
    """A prototype loss stand-in that records the features it was given and returns ``value``."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, features, student, other):
        self.calls.append((features, student, other))
        return torch.tensor(self.value)


@pytest.mark.parametrize("dice_a, dice_b, weaker", [(0.9, 0.2, "a"), (0.2, 0.9, "b"), (0.5, 0.5, "b")])  # a tie: B
def test_prototype_loss_takes_the_weaker_networks_features(dice_a, dice_b, weaker):
    trainer, _ = make_trainer(loss_weights={"cps": 0.0, "cos": 0.0, "proto": 0.5})
    trainer.proto_loss = Recorder(3.0)
    f_a, f_b, u_a, u_b = torch.zeros(1, 2, 4), torch.ones(1, 2, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    out = {"dice_a": torch.tensor(dice_a), "dice_b": torch.tensor(dice_b)}  # Dice *losses*: higher is worse
    total = trainer._unsupervised(out, u_a, u_b, u_a, u_b, f_a, f_b)
    (features, student, other), = trainer.proto_loss.calls
    assert torch.equal(features, f_a if weaker == "a" else f_b)
    assert student is u_a and other is u_b
    assert float(out["proto_on_a"]) == (weaker == "a") and float(total) == pytest.approx(0.5 * 3.0)


def test_prototype_loss_on_both_networks():
    trainer, _ = make_trainer(proto_on="both", loss_weights={"cps": 0.0, "cos": 0.0, "proto": 0.5})
    trainer.proto_loss = Recorder(3.0)
    f_a, f_b, u_a, u_b = (torch.full((1, 2, 4), float(i)) for i in range(4))
    total = trainer._unsupervised({}, u_a, u_b, u_a, u_b, f_a, f_b)
    assert [(c[0] is f, c[1] is s, c[2] is o) for c, (f, s, o) in
            zip(trainer.proto_loss.calls, [(f_a, u_a, u_b), (f_b, u_b, u_a)])] == [(True, True, True)] * 2
    assert float(total) == pytest.approx(0.5 * (3.0 + 3.0))


def test_total_loss_is_the_weighted_sum_of_its_terms():
    """Distinct weights for every term: the reported loss is exactly their weighted sum."""
    weights = {"cps": 0.3, "proto": 0.7, "cos": 1.9}
    trainer, _ = make_trainer(loss_weights=weights, epoch_length=1)
    trainer.supervised_loss = SupervisedLoss(alpha=0.37, threshold=0.5)  # >= 0.5: every disagreement counts
    trainer.run()
    out = trainer.state.output
    assert all(float(out[k]) > 0 for k in ("corr_a", "corr_b", "loss_cps", "loss_cos"))
    expected = sum(out[f"ce_{n}"] + out[f"dice_{n}"] + 0.37 * out[f"corr_{n}"] for n in "ab")
    expected = expected + sum(w * out[f"loss_{k}"] for k, w in weights.items())
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)


def save_state(path, iteration, **extra):
    torch.save({"trainer": {"iteration": iteration, "epoch": 1, "epoch_length": 2, "max_epochs": 9}, **extra}, path)


def test_latest_checkpoint_is_chosen_by_iteration_not_name_or_time(tmp_path):
    save_state(tmp_path / "checkpoint_epoch=9.pt", 4)   # highest by name, written last: not the latest
    save_state(tmp_path / "final.pt", 12)
    save_state(tmp_path / "checkpoint_epoch=3.pt", 6)
    torch.save({"net": torch.zeros(1)}, tmp_path / "zzz_model.pt")  # no trainer state: ignored
    os.utime(tmp_path / "final.pt", (1, 1))  # the oldest file
    assert latest_checkpoint(tmp_path) == tmp_path / "final.pt"
    (tmp_path / "final.pt").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=3.pt"
    for path in tmp_path.glob("checkpoint_*.pt"):
        path.unlink()
    assert latest_checkpoint(tmp_path) is None  # a folder of files without trainer state has nothing to resume


@pytest.mark.parametrize("enabled", [True, False])
def test_resume_handler_follows_its_switch(tmp_path, enabled):
    trainer, net = make_trainer(epoch_length=2)
    trainer.state.max_epochs = 2
    AtomicCheckpointSaver(str(tmp_path), {"trainer": trainer, "net": net}, save_interval=1, n_saved=1).attach(trainer)
    trainer.run()  # leaves checkpoint_epoch=2.pt at iteration 4
    fresh, fresh_net = make_trainer(epoch_length=2)
    fresh.state.max_epochs = 3
    ResumeHandler(str(tmp_path), {"trainer": fresh, "net": fresh_net}, enabled=enabled).attach(fresh)
    started = []
    fresh.add_event_handler(Events.ITERATION_STARTED(once=1) | Events.ITERATION_STARTED(once=5),
                            lambda e: started.append(e.state.iteration))
    fresh.run()
    assert started == ([5] if enabled else [1, 5])
