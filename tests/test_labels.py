"""Class names: the ``label_names`` config value, in metadata.json, the evaluation reports and the montage
legends; a 3-class bundle end to end (train, evaluate, infer, montages)."""

import csv
import json

import matplotlib.figure
import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser, ConfigWorkflow, run

from conftest import CONFIGS, TINY_NET, tiny_overrides
from monai_dualssl import ConfigError, class_names, make_synthetic_dataset, save_montage


@pytest.mark.parametrize(
    "label_names, num_classes, expected",
    [
        ({"left_atrium": 1}, 2, {0: "background", 1: "left_atrium"}),
        ({"lesion": 2, "organ": 1}, 3, {0: "background", 1: "organ", 2: "lesion"}),
        ({"whole tumour": 1}, None, {0: "background", 1: "whole tumour"}),
        (None, 3, {0: "background", 1: "class_1", 2: "class_2"}),
    ],
)
def test_class_names(label_names, num_classes, expected):
    names = class_names(label_names, num_classes)
    assert names == expected and list(names) == sorted(names)


@pytest.mark.parametrize(
    "label_names, num_classes, message",
    [
        ({"organ": 1}, 3, r"label values \[2\] have no name \(num_classes=3"),
        ({"organ": 1, "lesion": 2}, 2, r"'lesion': label value 2 outside 1..1 \(num_classes=2\)"),
        ({"organ": 1, "lesion": 1}, 3, "'lesion' and 'organ' both name label value 1"),
        ({"background": 0, "organ": 1}, 2, "background \\(0\\) is implicit"),
        ({"organ": "1"}, 2, "'organ': the label value must be an integer, found '1'"),
        ({"organ": True}, 2, "must be an integer"),
        ({"organ/a": 1}, 2, "a class name is a word"),
        ({"Organ": 1, "organ": 2}, 3, "'organ' is given twice"),
        ({}, 2, "label_names must be a dict"),
        (["organ"], 2, "label_names must be a dict"),
        ({"organ": 1}, 1, "num_classes must be an integer >= 2"),
    ],
)
def test_class_names_refuses(label_names, num_classes, message):
    with pytest.raises(ConfigError, match=message):
        class_names(label_names, num_classes)


def test_every_dataset_config_names_its_class():
    expected = {"train.yaml": {"atrium": 1}, "la.yaml": {"left_atrium": 1}, "pancreas.yaml": {"pancreas": 1},
                "brats.yaml": {"whole_tumour": 1}, "inference.json": {"left_atrium": 1}}
    for name, names in expected.items():
        assert ConfigParser.load_config_file(str(CONFIGS / name))["label_names"] == names, name


def test_metadata_names_the_classes_of_the_served_model():
    """metadata.json describes the model inference.json serves: the same class names, in channel order."""
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    infer = ConfigParser.load_config_file(str(CONFIGS / "inference.json"))
    names = class_names(infer["label_names"], infer["num_classes"])
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {str(c): n for c, n in names.items()}
    assert pred["num_channels"] == infer["num_classes"]
    assert all(f"{c} {n}" in meta["label_classes"] for c, n in names.items())
    assert all(f"channel {c} {n}" in meta["pred_classes"] for c, n in names.items())


def test_configs_refuse_label_names_that_do_not_fit_num_classes(tiny_dataset, tmp_path):
    wf = ConfigWorkflow(config_file=str(CONFIGS / "train.yaml"), logging_file=False, workflow_type=None,
                        **tiny_overrides(tiny_dataset, tmp_path, num_classes=3))
    with pytest.raises(Exception) as error:
        wf.initialize()
    assert "label values [2] have no name" in "".join(str(e) for e in (error.value, error.value.__cause__))
    assert not (tmp_path / "runs").exists()  # refused before anything is written


@pytest.fixture
def legends(monkeypatch):
    """The legend texts of every figure saved while the test runs."""
    found = []
    save = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        found.append([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return found


def test_montage_legend_names_the_classes(tmp_path, legends):
    seg = np.zeros((16, 16, 8), np.uint8)
    seg[4:8, 4:8, 2:6], seg[9:12, 9:12, 2:6] = 1, 2
    save_montage(np.random.default_rng(0).random(seg.shape), seg, tmp_path / "a.png", label=seg,
                 label_names={"organ": 1, "lesion": 2})
    save_montage(np.random.default_rng(0).random(seg.shape), seg, tmp_path / "b.png")
    assert legends == [["organ", "lesion", "ground truth"], ["class 1", "class 2"]]


NAMES = {"organ": 1, "lesion": 2}


@pytest.fixture(scope="module")
def three_class_dataset(tmp_path_factory):
    """The tiny synthetic dataset with its atrium split in two classes along x (1 and 2)."""
    root = tmp_path_factory.mktemp("three_classes")
    make_synthetic_dataset(root, num_cases=6, num_labeled=2, num_val=2, shape=(32, 32, 32), seed=3)
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        img = nib.load(path)
        label = np.asarray(img.dataobj).astype(np.uint8)
        x = np.indices(label.shape)[0]
        label[(label == 1) & (x < np.median(x[label == 1]))] = 2
        nib.save(nib.Nifti1Image(label, img.affine), path)
    return root


def test_three_classes_end_to_end(three_class_dataset, tmp_path, legends):
    """Train, evaluate and infer a 3-class bundle: every report and picture names the classes."""
    overrides = tiny_overrides(three_class_dataset, tmp_path, num_classes=3, label_names=NAMES)
    train = ConfigWorkflow(config_file=str(CONFIGS / "train.yaml"), logging_file=False, workflow_type=None, **overrides)
    train.initialize()
    train.run()
    assert (tmp_path / "models" / "model.pt").is_file()

    evaluate = ConfigWorkflow(config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")], logging_file=False,
                              workflow_type=None, run_id="evaluating", **overrides, protocol="fast", eval_models=["ensemble"])
    evaluate.initialize()
    evaluate.run()
    eval_dir = tmp_path / "runs" / "demo" / "eval" / "fast"
    with open(eval_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["case", "model", "postprocessing", "class", "class_name"]
    assert {(r["class"], r["class_name"]) for r in rows} == {("1", "organ"), ("2", "lesion")}
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["class_names"] == {"1": "organ", "2": "lesion"}
    table = (eval_dir / "summary.md").read_text()
    assert table.count("| ensemble | none | organ |") == 1 and table.count("| ensemble | lcc | lesion |") == 1

    out = tmp_path / "inference"
    images = three_class_dataset / "imagesTr"
    infer = dict(bundle_root=str(tmp_path), input=str(images), output_dir=str(out), device="$torch.device('cpu')",
                 amp=False, num_workers=0, pixdim=[0, 0, 0], image_reader=None, patch_size=[32, 32, 16],
                 num_classes=3, label_names=NAMES, montage_label_dir=str(three_class_dataset / "labelsTr"), **TINY_NET)
    run(config_file=str(CONFIGS / "inference.json"), logging_file=False, **infer)
    segs = sorted(out.glob("*_seg.nii.gz"))
    assert len(segs) == 6 and all(set(np.unique(np.asarray(nib.load(s).dataobj))) <= {0, 1, 2} for s in segs)
    run("montages", config_file=str(CONFIGS / "inference.json"), logging_file=False, **infer)
    assert len(legends) == 6
    assert all(legend[:2] == ["organ", "lesion"] and legend[-1] == "ground truth" for legend in legends)
