"""The dual trainer, its handlers and train.yaml end to end on tiny generated data."""

import os
import signal
import socket
import subprocess
import sys
import time
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


def test_kill_and_resume(tmp_path, tiny_dataset):
    """SIGKILL mid-run, restart with --resume from another directory (--bundle_root): same end state."""
    ckpt_dir = tmp_path / "runs" / "demo" / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(bundle_cmd(tmp_path, tiny_dataset), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(int(p.stem.split("=")[-1]) >= 2 for p in ckpt_dir.glob("*epoch=*.pt")):
            break  # at least 4 of 12 iterations done (2 epochs of 2)
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(latest_checkpoint(ckpt_dir), weights_only=True)["trainer"]["iteration"]
    assert 4 <= killed_at < 12
    result = subprocess.run(bundle_cmd(tmp_path, tiny_dataset, "--resume", "True"), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from" in result.stderr + result.stdout
    for path in ckpt_dir.iterdir():  # every file is a complete checkpoint, no temporary leftovers
        assert path.suffix == ".pt" and torch.load(path, weights_only=True)["trainer"]["iteration"] > 0
    final = torch.load(ckpt_dir / "final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 12
    assert final["lr_scheduler_a"]["last_epoch"] == 12


def test_ddp_two_processes_gloo(tmp_path, tiny_dataset):
    """multi_gpu_train.yaml under torchrun: 2 CPU processes (gloo), checkpoints from rank 0 only."""
    configs = repr([str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml")])
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            "-m", "monai.bundle", "run", "training", "--config_file", configs]
    for key, value in tiny_overrides(tiny_dataset, tmp_path, max_iterations=4).items():
        args += [f"--{key}", str(value) if not isinstance(value, (list, bool)) else repr(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    final = torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4
    assert not any(k.startswith("module.") for k in final["network_a"])  # plain network weights, not DDP's
    assert (tmp_path / "models" / "model.pt").is_file()


def test_input_transform_b_only_changes_network_b_input():
    seen = {}
    trainer, net = make_trainer(input_transform_b=lambda x: x + 100.0)
    for name in ("net_a", "net_b"):
        getattr(net, name).encoder.register_forward_pre_hook(lambda m, args, n=name: seen.__setitem__(n, args[0].detach()))
    trainer.run()
    assert torch.allclose(seen["net_b"], seen["net_a"] + 100.0)
