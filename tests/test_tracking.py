"""Experiment tracking through MONAI's own switch: ``monai.bundle run training --tracking mlflow``.

mlflow is an optional extra (``pip install -e ".[mlflow]"``): without it these tests skip, except under
CI=true, where they must run (``run.sh test`` installs the extra).
"""

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIGS, tiny_overrides

if os.environ.get("CI") == "true":
    import mlflow  # noqa: F401  (CI must run these tests, not skip them)
mlflow = pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install -e '.[mlflow]'")


def cli_overrides(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", str(value) if not isinstance(value, list) else str(value).replace(" ", "")]
    return args


def test_tracking_mlflow_logs_parameters_every_term_validation_and_best_model(tiny_dataset, tmp_path):
    root = tmp_path / "bundle"
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
            "--tracking", "mlflow", *cli_overrides(tiny_overrides(tiny_dataset, root))]
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]

    output_dir = root / "runs" / "demo"
    assert (output_dir / "mlruns.db").is_file()  # the local store, in the run folder
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(path_to_sqlite_uri(output_dir / "mlruns.db"))
    experiment = client.get_experiment_by_name("monai_dualssl")
    runs = client.search_runs(experiment.experiment_id)
    assert len(runs) == 1 and runs[0].info.run_name == "demo" and runs[0].info.status == "FINISHED"
    info, data = runs[0].info, runs[0].data

    # every scalar TensorBoard shows (each loss term, ramped weight, lr) and the validation Dice
    events = EventAccumulator(str(output_dir))
    events.Reload()
    tensorboard = set(events.Tags()["scalars"])
    assert {"loss", "loss_cps", "loss_proto", "loss_cos", "ce_a", "dice_b", "corr_a", "w_cps", "lr_a", "lr_b"} <= tensorboard
    assert tensorboard <= set(data.metrics)
    assert "val_mean_dice" in data.metrics
    assert len(client.get_metric_history(info.run_id, "loss_cps")) == 4  # every log_interval (1) of 4 iterations
    assert [m.step for m in client.get_metric_history(info.run_id, "val_mean_dice")] == [1, 2]

    # the run's parameters
    assert data.params["lr"] == "0.05" and data.params["lambda_u"] == "1.0" and data.params["patch_size"] == "[32, 32, 16]"
    assert data.params["max_iterations"] == "4" and data.params["keep_ratio"] == "0.8"

    # the configuration and the best model, as artifacts under <output_dir>/mlruns
    assert {a.path for a in client.list_artifacts(info.run_id)} == {"config.json", "model.pt"}
    assert experiment.artifact_location.startswith((output_dir / "mlruns").as_uri())
    assert (output_dir / "mlruns" / info.run_id / "artifacts" / "model.pt").read_bytes() == (root / "models" / "model.pt").read_bytes()


def test_without_tracking_there_is_no_mlflow_store(tiny_dataset, tmp_path):
    from monai.bundle import run

    root = tmp_path / "bundle"
    run("training", config_file=str(CONFIGS / "train.yaml"), logging_file=False, **tiny_overrides(tiny_dataset, root, max_iterations=2))
    output_dir = root / "runs" / "demo"
    assert list(output_dir.glob("events.out.tfevents.*"))  # TensorBoard, as always
    assert not (output_dir / "mlruns.db").exists() and not (output_dir / "mlruns").exists()
