"""Mixed precision in the trainer and benchmarks/gpu_check.py, on a CPU.

float16 trains with an enabled GradScaler whose state goes into ``trainer.state_dict()`` (the
checkpoint's ``trainer`` entry) and comes back on resume; bfloat16 (and float32) has none. train.yaml
runs from the command line with ``--amp true --amp_dtype bfloat16``. ``gpu_check.py --smoke`` runs
the la.yaml trainer in seconds and reports finite numbers. (CPU float16 convolutions' backward is
slow in PyTorch: the float16 cases use the smallest patches.)
"""

import math
import re
import os
import subprocess
import sys

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader, Dataset

from conftest import CONFIGS, REPO, tiny_overrides
from monai_dualssl import (
    CosineConsistencyLoss,
    CrossConsistencyLoss,
    DualNet,
    DualSSLTrainer,
    PrototypeContrastiveLoss,
    SupervisedLoss,
)

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

FRESH_SCALER = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
TERMS = ("ce_a", "dice_a", "corr_a", "ce_b", "dice_b", "corr_b", "loss_cps", "loss_proto", "loss_cos", "loss")


def amp_trainer(dtype, amp=True, epoch_length=3):
    """A tiny trainer on 16^3 patches (2 labeled + 2 unlabeled) with autocast ``dtype`` on the CPU."""
    torch.manual_seed(0)
    net = DualNet(n_filters=4, resnet_blocks=(1, 1, 1, 1), vnet_stages=(1, 1, 1, 1, 1), proj_dim=8)
    g = torch.Generator().manual_seed(1)
    labeled = [{"image": torch.randn(1, 16, 16, 16, generator=g), "label": (torch.rand(1, 16, 16, 16, generator=g) > 0.5).long()}
               for _ in range(2)]
    unlabeled = [{"image": torch.randn(1, 16, 16, 16, generator=g)} for _ in range(2)]
    trainer = DualSSLTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=epoch_length,
        train_data_loader=DataLoader(Dataset(labeled), batch_size=2),
        unlabeled_data_loader=DataLoader(Dataset(unlabeled), batch_size=2),
        network_a=net.net_a,
        network_b=net.net_b,
        optimizer_a=torch.optim.SGD(net.net_a.parameters(), lr=0.01),
        optimizer_b=torch.optim.SGD(net.net_b.parameters(), lr=0.01),
        supervised_loss=SupervisedLoss(),
        cps_loss=CrossConsistencyLoss(),
        proto_loss=PrototypeContrastiveLoss(min_samples=4),
        cos_loss=CosineConsistencyLoss(),
        amp=amp,
        amp_kwargs={"dtype": dtype},
    )
    return trainer, net


def test_float16_uses_a_gradscaler_saved_and_restored(tmp_path):
    trainer, net = amp_trainer(torch.float16)
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler.is_enabled()
    trainer.run()
    assert all(math.isfinite(float(trainer.state.output[k])) for k in TERMS)
    trainer.scaler.update(new_scale=512.0)  # a scale no fresh scaler has
    state = trainer.state_dict()
    assert state["scaler"]["scale"] == 512.0 and state["scaler"] != FRESH_SCALER
    torch.save({"trainer": state}, tmp_path / "checkpoint.pt")

    resumed, _ = amp_trainer(torch.float16)
    assert resumed.scaler.state_dict() == FRESH_SCALER
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainer"])
    assert resumed.scaler.state_dict() == state["scaler"]
    # the restored scaler is the one the next steps use (run() must not replace it)
    used = []
    resumed.add_event_handler(Events.ITERATION_STARTED, lambda e: used.append(e.scaler.get_scale()))
    resumed.state.max_epochs = 2
    resumed.run()
    assert used[0] == 512.0 and resumed.state.iteration == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_and_float32_have_no_scaler(dtype):
    trainer, net = amp_trainer(dtype, amp=dtype != torch.float32)
    assert not trainer.scaler.is_enabled()
    seen = []
    conv = next(m for m in net.net_a.modules() if isinstance(m, torch.nn.Conv3d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = {k: p.clone() for k, p in net.named_parameters()}
    trainer.run()
    assert seen[0] == dtype  # autocast is on (bfloat16) or off (float32)
    assert trainer.state_dict()["scaler"] == {}
    assert all(math.isfinite(float(trainer.state.output[k])) for k in TERMS)
    for name in ("net_a", "net_b"):
        assert any(not torch.equal(before[k], p) for k, p in net.named_parameters() if k.startswith(name))


def test_float16_resumes_a_checkpoint_without_scaler_state():
    """A float32 or bfloat16 checkpoint (e.g. a CPU run continued on a GPU) starts a fresh scale."""
    trainer, _ = amp_trainer(torch.bfloat16, epoch_length=1)
    trainer.run()
    resumed, _ = amp_trainer(torch.float16, epoch_length=1)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.scaler.state_dict() == FRESH_SCALER and resumed.state.iteration == 1


def test_train_yaml_float16_scaler_in_checkpoint_and_resumed(tmp_path, tiny_dataset):
    """train.yaml with amp float16: the checkpoint's trainer entry holds the GradScaler, --resume restores it."""
    overrides = tiny_overrides(tiny_dataset, tmp_path, amp=True, amp_dtype="float16", patch_size=[16, 16, 16],
                               max_iterations=4, epoch_length=2, val_interval=100)

    def workflow(**extra):
        wf = ConfigWorkflow(config_file=str(CONFIGS / "train.yaml"), meta_file=str(CONFIGS / "metadata.json"),
                            logging_file=str(CONFIGS / "logging.conf"), workflow_type="train", **{**overrides, **extra})
        wf.initialize()
        return wf, wf.parser.get_parsed_content("train#trainer")

    wf, trainer = workflow()
    assert trainer.scaler.is_enabled()
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())  # stop after 2 of 4
    wf.run()
    wf.finalize()
    ckpt = torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "final.pt", weights_only=True)
    saved = ckpt["trainer"]["scaler"]
    assert ckpt["trainer"]["iteration"] == 2 and saved["scale"] > 0 and saved != FRESH_SCALER

    wf, trainer = workflow(resume=True)
    restored = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: restored.append(e.scaler.state_dict()))
    wf.run()
    wf.finalize()
    assert restored[0] == saved and trainer.state.iteration == 4


def test_train_yaml_amp_bfloat16_from_the_command_line(tmp_path, tiny_dataset):
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml")]
    # patch 64x64x16 (volumes padded to it): at 32x32x16 the deepest level is 2x2x1, where PyTorch's CPU bfloat16
    # conv3d weight gradient can be non-finite (the trainer then stops, see test_engines)
    for key, value in tiny_overrides(tiny_dataset, tmp_path, amp="true", amp_dtype="bfloat16", patch_size=[64, 64, 16]).items():
        args += [f"--{key}", str(value) if not isinstance(value, (list, bool)) else repr(value)]
    result = subprocess.run(args, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    final = torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4 and final["trainer"]["scaler"] == {}
    assert '"amp_dtype": "bfloat16"' in final["config"]["config"]
    assert all(torch.isfinite(v).all() for v in final["network_a"].values() if v.is_floating_point())


def run_gpu_check(tmp_path, *args):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--device", "cpu", *args],
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])-?(?:\d+\.?\d*(?:e-?\d+)?|nan|inf)", line)]


@pytest.mark.parametrize("extra", [(), ("--amp_dtype", "float16", "--iterations", "2")], ids=["bfloat16", "float16"])
def test_gpu_check_smoke_on_cpu(tmp_path, extra):
    code, out = run_gpu_check(tmp_path, *extra)
    assert code == 0, out[-3000:]
    assert "OK: every loss term finite" in out
    dtype = "float16" if extra else "bfloat16"
    assert f"AMP {dtype}" in out
    lines = {line.split(":")[0]: line for line in out.splitlines() if ":" in line}
    per_iteration = numbers(lines["seconds per iteration (excluding the first)"].split(":", 1)[1])
    rss = numbers(lines["peak RSS"].split(":", 1)[1])
    terms = dict(re.findall(r"(\w+) (\S+)", lines["last loss terms"].split(":", 1)[1]))
    assert all(math.isfinite(x) and x > 0 for x in per_iteration + rss)
    assert set(TERMS) <= set(terms) and all(math.isfinite(float(v)) for v in terms.values())
    iterations = [line for line in out.splitlines() if line.startswith("iteration ")]
    assert len(iterations) == (2 if extra else 3)
    if extra:
        assert re.search(r"GradScaler: [01] of 2 steps skipped", out), out[-2000:]
    else:
        assert "GradScaler: off (bfloat16)" in out
    changed = re.search(r"parameter tensors changed: A (\d+)/(\d+), B (\d+)/(\d+)", out)
    assert int(changed[1]) > 0 and int(changed[3]) > 0
    assert list(tmp_path.iterdir()) == []  # nothing written where it runs
    assert not (REPO / "bundle" / "runs" / "gpu_check").exists()


def test_gpu_check_fails_on_a_non_finite_term(monkeypatch, capsys):
    original = gpu_check.monai_dualssl.loss_terms
    monkeypatch.setattr(gpu_check.monai_dualssl, "loss_terms", lambda out: {**original(out), "loss_cos": float("nan")})
    assert gpu_check.main(["--smoke", "--device", "cpu", "--iterations", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: iteration 1: non-finite loss_cos; iteration 2: non-finite loss_cos" in out


def test_gpu_check_rejects_zero_iterations():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--iterations", "0"])
