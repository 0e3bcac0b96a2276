"""MONAI Label backend: inference, retraining and uncertainty ranking through MONAI Label's own tasks.

Runs in the MONAI Label environment (tests/monailabel_env.sh); test_labelapp_env.py runs this file
there from the main suite.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("monailabel", reason="runs in the MONAI Label environment (test_labelapp_env.py)")

from monai.bundle import ConfigParser  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.interfaces.utils.app import app_instance  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from conftest import CONFIGS, TINY_NET, blob_image  # noqa: E402
from monai_dualssl.labelapp import DEFAULT_STRATEGY, SCORE_KEYS, DualSSLInferTask, DualSSLTrainTask, create_app  # noqa: E402


def make_bundle(root, **infer_values):
    """The bundle's configs with tiny networks (and ``infer_values`` in inference.json) and a model.pt of
    random weights, in the folder ``root``."""
    shutil.copytree(CONFIGS, root / "configs")
    infer = json.loads((root / "configs" / "inference.json").read_text())
    infer.update(TINY_NET, **infer_values)
    (root / "configs" / "inference.json").write_text(json.dumps(infer, indent=2))
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture
def bundle(tmp_path):
    """The bundle's configs with tiny networks and a model.pt of random weights, in a temporary folder."""
    return make_bundle(tmp_path / "bundle")


def volume(path, shape=(40, 36, 20), seed=0):
    """A NIfTI image with a bright ball, anisotropic voxels and an oblique-free but shifted affine."""
    image, ball = blob_image(shape, seed)
    affine = np.diag([0.9, 1.1, 2.0, 1.0])
    affine[:3, 3] = [-20.0, 15.0, 4.0]
    nib.save(nib.Nifti1Image(image, affine), path)
    return ball.astype(np.uint8), affine


def test_bundle_infer_task_returns_label_in_input_geometry(bundle, tmp_path):
    _, affine = volume(tmp_path / "case.nii.gz")
    task = DualSSLInferTask(str(bundle), {})
    assert task.is_valid() and task.labels == {"left_atrium": 1}
    label_file, result = task({"image": str(tmp_path / "case.nii.gz"), "device": "cpu"})
    label = nib.load(label_file)
    assert label.shape == (40, 36, 20)
    assert np.allclose(label.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
    assert result["label_names"] == {"left_atrium": 1}


def datastore(root, labeled=3, unlabeled=2):
    """A MONAI Label local datastore: ``labeled`` images with final labels and ``unlabeled`` without."""
    (root / "labels" / "final").mkdir(parents=True)
    for i in range(labeled + unlabeled):
        ball, affine = volume(root / f"case{i}.nii.gz", shape=(32, 32, 20), seed=i)
        if i < labeled:
            nib.save(nib.Nifti1Image(ball, affine), root / "labels" / "final" / f"case{i}.nii.gz")
    return LocalDatastore(str(root), extensions=("*.nii.gz",), auto_reload=False)


def test_bundle_train_task_updates_both_networks(bundle, tmp_path):
    store = datastore(tmp_path / "studies")
    assert len(store.get_labeled_images()) == 3 and len(store.get_unlabeled_images()) == 2
    before = torch.load(bundle / "models" / "model.pt", weights_only=True)
    overrides = {**TINY_NET, "patch_size": [32, 32, 16], "epoch_length": 2, "val_interval": 2,
                 "batch_labeled": 1, "batch_unlabeled": 1, "rampup_iterations": 2, "log_interval": 1, "num_workers": 0}
    task = DualSSLTrainTask(str(bundle), {}, overrides=overrides)
    assert task.is_valid()
    task({"model": "dualssl", "max_epochs": 1, "val_split": 0.34, "device": "cpu", "multi_gpu": False}, store)

    after = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert after.keys() == before.keys()
    for net in ("net_a.", "net_b."):
        changed = [k for k in before if k.startswith(net) and not torch.equal(before[k], after[k])]
        assert changed, f"{net} weights unchanged"
    run = bundle / "runs" / "monailabel"
    state = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2  # one epoch of epoch_length iterations
    logs = EventAccumulator(str(run))
    logs.Reload()
    assert {"loss_cps", "loss_cos"} <= set(logs.Tags()["scalars"])  # the unlabeled images were used


def test_app_serves_the_bundle_and_next_sample_is_the_most_uncertain(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)  # no server to call back
    studies = tmp_path / "studies"
    datastore(studies, labeled=1, unlabeled=3)
    app = app_instance(app_dir=create_app(tmp_path / "app"), studies=str(studies), conf={"bundle": str(bundle)})
    info = app.info()
    assert info["models"]["dualssl"]["labels"] == {"left_atrium": 1}
    assert set(info["models"]) == {"dualssl"} and set(info["trainers"]) == {"dualssl"}
    assert list(info["strategies"]) == ["expected_dice", "disagreement", "random", "first"]
    assert set(info["scoring"]) == {"dualssl"}

    store = app.datastore()
    summary = app.scoring({"method": "dualssl", "device": "cpu"})
    assert summary["executed"] == 3
    for name, key in SCORE_KEYS.items():
        scores = {i: store.get_image_info(i)[key] for i in store.get_unlabeled_images()}
        assert len(scores) == 3 and all(0 <= s for s in scores.values()), name
        assert app.next_sample({"strategy": name})["id"] == max(scores, key=scores.get), name
    # scores are kept until model.pt changes
    assert app.scoring({"method": "dualssl", "device": "cpu"})["executed"] == 0


def test_scores_are_stored_under_their_own_keys(bundle, tmp_path):
    """Both networks made to output logits 0 everywhere: they agree (disagreement 0) on p = 1/2, whose argmax is
    background, so the expected Dice error of the foreground is about 1 (1 - 1 / (V / 2 + 1))."""
    from monai_dualssl.labelapp import DualNetScoring

    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    for net in ("net_a", "net_b"):
        weights[f"{net}.out_conv.weight"].zero_()
        weights[f"{net}.out_conv.bias"].zero_()
    torch.save(weights, bundle / "models" / "model.pt")
    store = datastore(tmp_path / "studies", labeled=0, unlabeled=1)
    assert DualNetScoring(str(bundle))({"device": "cpu"}, store)["executed"] == 1
    info = store.get_image_info("case0")
    assert info[SCORE_KEYS["disagreement"]] == 0 and 0.999 < info[SCORE_KEYS["expected_dice"]] < 1


def test_next_sample_without_a_strategy_takes_the_default_or_the_conf_strategy(bundle, tmp_path, monkeypatch):
    """MONAI Label's own default is random: a request naming no strategy gets expected_dice, or ``--conf strategy``,
    which is also listed first."""
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)
    studies = tmp_path / "studies"
    datastore(studies, labeled=1, unlabeled=4)
    app = app_instance(app_dir=create_app(tmp_path / "app"), studies=str(studies), conf={"bundle": str(bundle)})
    store = app.datastore()
    # scores that rank the images differently: expected_dice picks case2, disagreement case4, first case1
    for i, (dice_error, kl) in {"case1": (0.1, 0.1), "case2": (0.9, 0.2), "case3": (0.2, 0.3), "case4": (0.3, 0.8)}.items():
        store.update_image_info(i, {SCORE_KEYS["expected_dice"]: dice_error, SCORE_KEYS["disagreement"]: kl})
    assert DEFAULT_STRATEGY == "expected_dice"
    assert SCORE_KEYS == {"expected_dice": "dualssl_expected_dice", "disagreement": "dualssl_disagreement"}
    assert [app.next_sample({})["id"] for _ in range(2)] == ["case2", "case2"]  # random would vary
    assert app.next_sample({"strategy": "disagreement"})["id"] == "case4"
    for strategy, expected in (("disagreement", "case4"), ("first", "case1")):
        other = app_instance(app_dir=create_app(tmp_path / f"app_{strategy}"), studies=str(studies),
                             conf={"bundle": str(bundle), "strategy": strategy})
        assert other.next_sample({})["id"] == expected
        assert list(other.info()["strategies"])[0] == strategy  # what a client offers first
    with pytest.raises(ValueError, match=r"--conf strategy 'entropy': expected one of expected_dice, disagreement"):
        app_instance(app_dir=create_app(tmp_path / "app_bad"), studies=str(studies),
                     conf={"bundle": str(bundle), "strategy": "entropy"})


def test_scoring_ranks_an_ambiguous_volume_above_a_clean_one(tmp_path, monkeypatch):
    """The shipped LA model on a validation case: the same case with noise (sigma 1 on the z-scored
    image) makes the two networks disagree more than the clean case, and "next sample" picks it."""
    import h5py

    from conftest import REPO, require_la

    la = require_la()
    case = la.joinpath("train.list").read_text().split()[-1]  # validation split: never trained on
    h5 = la / "volumes" / case / "mri_norm2.h5"
    image = h5py.File(h5 if h5.is_file() else la / case / "mri_norm2.h5")["image"][()].astype(np.float32)
    studies = tmp_path / "studies"
    studies.mkdir()
    affine = np.diag([0.625, 0.625, 0.625, 1.0])
    noisy = image + np.random.default_rng(0).normal(0, 1.0, image.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), studies / "clean.nii.gz")
    nib.save(nib.Nifti1Image(noisy, affine), studies / "ambiguous.nii.gz")

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)
    app = app_instance(app_dir=create_app(tmp_path / "app"), studies=str(studies), conf={"bundle": str(REPO / "bundle")})
    app.scoring({"method": "dualssl", "device": "cpu"})
    store = app.datastore()
    clean, ambiguous = (store.get_image_info(i)[SCORE_KEYS["disagreement"]] for i in ("clean", "ambiguous"))
    assert ambiguous > 1.5 * clean > 0
    assert app.next_sample({"strategy": "disagreement"})["id"] == "ambiguous"


def test_monailabel_epistemic_scoring_sets_dropout_on_network_def(bundle, tmp_path):
    """MONAI Label's own dropout-based scoring: BundleInferTask sets ``dropout`` on network_def."""
    from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring

    store = datastore(tmp_path / "studies", labeled=1, unlabeled=2)
    task = DualSSLInferTask(str(bundle), {}, dropout=0.3, train_mode=True, skip_writer=True)
    assert task.bundle_config["network_def"]["dropout"] == 0.3
    summary = EpistemicScoring(task, max_samples=0, simulation_size=2)({"device": "cpu", "max_workers": 1}, store)
    assert summary["executed"] == 2
    assert all(store.get_image_info(i)["epistemic_entropy"] >= 0 for i in store.get_unlabeled_images())


def test_three_classes_are_named_by_label_names_in_the_infer_task_and_app_info(tmp_path, monkeypatch):
    """A 3-class bundle (background and two named classes): the labels MONAI Label shows are the config's names."""
    names = {"organ": 1, "lesion": 2}
    root = make_bundle(tmp_path / "bundle", num_classes=3, label_names=names)
    volume(tmp_path / "case.nii.gz")
    task = DualSSLInferTask(str(root), {})
    assert task.labels == names
    label_file, result = task({"image": str(tmp_path / "case.nii.gz"), "device": "cpu"})
    assert result["label_names"] == names
    assert set(np.unique(np.asarray(nib.load(label_file).dataobj))) <= {0, 1, 2}

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)
    datastore(tmp_path / "studies", labeled=1, unlabeled=1)
    app = app_instance(app_dir=create_app(tmp_path / "app"), studies=str(tmp_path / "studies"), conf={"bundle": str(root)})
    assert app.info()["models"]["dualssl"]["labels"] == names


def test_label_names_that_do_not_fit_num_classes_are_refused(tmp_path):
    root = make_bundle(tmp_path / "bundle", num_classes=3)  # label_names still {"left_atrium": 1}
    with pytest.raises(ValueError, match=r"label values \[2\] have no name"):
        DualSSLInferTask(str(root), {})


def test_train_task_trains_the_classes_the_infer_task_serves(bundle):
    task = DualSSLTrainTask(str(bundle), {})
    overrides = task._update_overrides({task.const.key_train_trainer_max_epochs(): 1, task.const.key_train_dataset_data(): [{"image": "a"}]})
    assert overrides["label_names"] == {"left_atrium": 1} and overrides["num_classes"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_over_http_lists_the_real_label_names_and_logs_in_the_app_folder(tmp_path):
    """``monailabel start_server`` on the app folder of ``python -m monai_dualssl.labelapp`` and the repository's
    bundle: /info names the shipped model's class, inference answers over HTTP, the log is in the app folder
    and nothing is written into the package."""
    from conftest import REPO

    package = REPO / "bundle" / "scripts"
    before = sorted(p.relative_to(package) for p in package.rglob("*") if "__pycache__" not in p.parts)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "OMP_NUM_THREADS": "1"}
    made = subprocess.run([sys.executable, "-m", "monai_dualssl.labelapp", str(tmp_path / "app")], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    app = made.stdout.strip()
    assert app == str(tmp_path / "app") and (tmp_path / "app" / "main.py").is_file()
    studies = tmp_path / "studies"
    studies.mkdir()
    volume(studies / "case.nii.gz", shape=(48, 40, 24))
    port = _free_port()
    server = subprocess.Popen(
        ["monailabel", "start_server", "--app", app, "--studies", str(studies), "--conf", "bundle", str(REPO / "bundle"),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        info, deadline = None, time.time() + 300
        while info is None and time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=10) as r:
                    info = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert info is not None, "the server did not answer /info"
        assert info["models"]["dualssl"]["labels"] == {"left_atrium": 1}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/infer/dualssl?image=case&output=image", method="POST")
        with urllib.request.urlopen(request, timeout=600) as r:
            (tmp_path / "label.nii.gz").write_bytes(r.read())
        assert nib.load(tmp_path / "label.nii.gz").shape == (48, 40, 24)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert (tmp_path / "app" / "logs" / "app.log").is_file()
    after = sorted(p.relative_to(package) for p in package.rglob("*") if "__pycache__" not in p.parts)
    assert after == before
