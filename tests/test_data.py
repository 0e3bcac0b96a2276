"""Data module: H5Reader, datalist builders, the synthetic dataset and preflight, on generated files."""

import json
import re
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from monai.bundle import ConfigWorkflow

from conftest import CONFIGS, require_la, tiny_overrides
from monai_dualssl import (
    DataError,
    H5Reader,
    build_datalist,
    check_inputs,
    folder_datalist,
    la_datalist,
    make_synthetic_dataset,
    msd_datalist,
    preflight,
    unlabeled_items,
)

IDS = [f"ID{i:02d}" for i in range(10)]


def write_h5(path, shape=(12, 10, 8), seed=0, **datasets):
    """h5 file with a float32 ``image`` and a uint8 ``label`` (override or add datasets by keyword)."""
    rng = np.random.default_rng(seed)
    arrays = {"image": rng.normal(size=shape).astype(np.float32), "label": (rng.random(shape) > 0.7).astype(np.uint8)}
    arrays.update(datasets)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            if array is not None:
                f.create_dataset(name, data=array)
    return arrays


def write_nifti(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), path)
    return str(path)


def make_la(root, ids=IDS, volumes=True):
    case_dir = root / "volumes" if volumes else root
    for i, case in enumerate(ids):
        write_h5(case_dir / case / "mri_norm2.h5", seed=i)
    (root / "train.list").write_text("\n".join(ids) + "\n")
    return root


def load_pair(path, spacing=(1.0, 1.0, 1.0)):
    transform = Compose(
        [
            LoadImaged(keys="image", reader=H5Reader(dataset="image", spacing=spacing)),
            LoadImaged(keys="label", reader=H5Reader(dataset="label", spacing=spacing)),
            EnsureChannelFirstd(keys=["image", "label"]),
        ]
    )
    return transform({"image": str(path), "label": str(path)})


def case_id(path):
    return Path(path).parent.name


# ---------------------------------------------------------------------------------------------- H5Reader


def test_h5_reader_loadimaged(tmp_path):
    path = tmp_path / "case" / "mri_norm2.h5"
    arrays = write_h5(path)
    out = load_pair(path, spacing=(0.625, 0.625, 0.625))
    assert tuple(out["image"].shape) == (1, 12, 10, 8) and tuple(out["label"].shape) == (1, 12, 10, 8)
    np.testing.assert_array_equal(out["image"][0].numpy(), arrays["image"])
    np.testing.assert_array_equal(out["label"][0].numpy(), arrays["label"])
    np.testing.assert_allclose(out["image"].affine.numpy(), np.diag([0.625, 0.625, 0.625, 1.0]))
    assert out["image"].meta["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(out["image"].meta["spatial_shape"], [12, 10, 8])


def test_h5_reader_by_name(tmp_path):
    path = tmp_path / "x.hdf5"
    arrays = write_h5(path)
    loader = LoadImaged(keys="label", reader="monai_dualssl.readers.H5Reader", dataset="label",
                        ensure_channel_first=True)
    np.testing.assert_array_equal(loader({"label": str(path)})["label"][0].numpy(), arrays["label"])
    config = {"reader": {"_target_": "H5Reader", "dataset": "label", "spacing": [0.625, 0.625, 0.625]}}
    reader = ConfigParser(config).get_parsed_content("reader")  # bundle configs name it by class name
    assert isinstance(reader, H5Reader) and reader.dataset == "label" and reader.spacing == (0.625, 0.625, 0.625)


def test_h5_reader_stacks_files_and_casts(tmp_path):
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for i, p in enumerate(paths):
        write_h5(p, seed=i)
    reader = H5Reader(dtype=np.float16)
    assert reader.verify_suffix(paths) and not reader.verify_suffix("x.nii.gz")
    array, meta = reader.get_data(reader.read(paths))
    assert array.shape == (2, 12, 10, 8) and array.dtype == np.float16 and meta["original_channel_dim"] == 0


def test_h5_reader_missing_dataset(tmp_path):
    path = tmp_path / "case.h5"
    write_h5(path, label=None)
    reader = H5Reader(dataset="label")
    expected = rf"{re.escape(str(path))}: no h5 dataset 'label' \(datasets found: \['image'\]\)"
    with pytest.raises(ValueError, match=expected):
        reader.get_data(reader.read(path))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: no h5 dataset 'label'"):
        LoadImaged(keys="label", reader=reader)({"label": str(path)})


def test_h5_reader_real_la():
    root = require_la()
    ids = (root / "train.list").read_text().split()[:2]
    for case in ids:
        out = load_pair(root / "volumes" / case / "mri_norm2.h5", spacing=(0.625, 0.625, 0.625))
        assert out["image"].shape[0] == 1 and out["image"].shape[3] == 88
        assert out["label"].shape == out["image"].shape
        assert set(np.unique(out["label"].numpy()).tolist()) <= {0, 1}
        assert np.isfinite(out["image"].numpy()).all()


# ---------------------------------------------------------------------------------------------- datalists


def assert_disjoint(datalist):
    images = [item["image"] for split in ("labeled", "unlabeled", "validation") for item in datalist[split]]
    assert len(images) == len(set(images))


@pytest.mark.parametrize("volumes", [True, False])
def test_la_datalist(tmp_path, volumes):
    root = make_la(tmp_path, volumes=volumes)
    datalist = la_datalist(root, num_labeled=3, num_val=2)
    assert [case_id(i["image"]) for i in datalist["labeled"]] == IDS[:3]
    assert [case_id(i["image"]) for i in datalist["unlabeled"]] == IDS[3:8]
    assert [case_id(i["image"]) for i in datalist["validation"]] == IDS[8:]
    for item in datalist["labeled"] + datalist["validation"]:
        assert item["image"] == item["label"] and Path(item["image"]).is_file()
    assert all(set(i) == {"image"} for i in datalist["unlabeled"])
    assert_disjoint(datalist)


def test_la_datalist_val_list(tmp_path):
    root = make_la(tmp_path, ids=IDS + ["T0", "T1"])
    (root / "train.list").write_text("\n".join(IDS))
    (root / "test.list").write_text("T0\nT1\n")
    datalist = la_datalist(root, num_labeled=4, val_list="test.list")
    assert [case_id(i["image"]) for i in datalist["validation"]] == ["T0", "T1"]
    assert len(datalist["labeled"]) == 4 and len(datalist["unlabeled"]) == 6


def test_la_datalist_errors(tmp_path):
    root = make_la(tmp_path)
    with pytest.raises(FileNotFoundError, match="other.list"):
        la_datalist(root, list_file="other.list")
    with pytest.raises(ValueError, match=r"num_labeled \(8\) \+ num_val \(4\).*10 labeled cases"):
        la_datalist(root, num_labeled=8, num_val=4)
    (root / "test.list").write_text("ID01\n")
    with pytest.raises(ValueError, match=r"ID01/mri_norm2.h5' is in more than one split \(labeled, validation\)"):
        la_datalist(root, num_labeled=2, val_list="test.list")
    (root / "train.list").write_text("\n".join(IDS + ["GHOST"]))
    with pytest.raises(FileNotFoundError, match="'GHOST'"):
        la_datalist(root)


def test_msd_datalist(tmp_path):
    training = [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(5)]
    spec = {"training": training, "unlabeled": [{"image": "./imagesTr/u0.nii.gz"}], "test": ["./imagesTs/t0.nii.gz"]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    datalist = msd_datalist(tmp_path / "dataset.json", num_labeled=2, num_val=1)
    assert datalist["labeled"] == [
        {"image": str(tmp_path / "imagesTr" / f"c{i}.nii.gz"), "label": str(tmp_path / "labelsTr" / f"c{i}.nii.gz")}
        for i in (0, 1)
    ]
    assert [Path(i["image"]).name for i in datalist["unlabeled"]] == ["c2.nii.gz", "c3.nii.gz", "u0.nii.gz"]
    assert [Path(i["image"]).name for i in datalist["validation"]] == ["c4.nii.gz"]
    assert all(set(i) == {"image"} for i in datalist["unlabeled"])

    spec["test"] = [{"image": "./imagesTs/t0.nii.gz", "label": "./labelsTs/t0.nii.gz"}, "./imagesTs/t1.nii.gz"]
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    datalist = msd_datalist(tmp_path / "dataset.json", num_val=3)  # labeled test items validate, num_val unused
    assert [Path(i["image"]).name for i in datalist["validation"]] == ["t0.nii.gz"] and len(datalist["labeled"]) == 5

    spec["validation"] = [training[0]]
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"c0.nii.gz' is in more than one split \(labeled, validation\)"):
        msd_datalist(tmp_path / "dataset.json")


def test_folder_datalist(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz", "e.nii.gz", "._a.nii.gz", "notes.txt"]:
        (tmp_path / "imagesTr" / name).touch()
    for name in ["a.nii.gz", "c.nii.gz", "d.nii.gz"]:
        (tmp_path / "labelsTr" / name).touch()
    datalist = folder_datalist(tmp_path / "imagesTr", tmp_path / "labelsTr", num_labeled=1, num_val=1)
    names = {split: [Path(i["image"]).name for i in items] for split, items in datalist.items()}
    assert names["labeled"] == ["a.nii.gz"] and names["validation"] == ["d.nii.gz"]
    assert names["unlabeled"] == ["c.nii.gz", "b.nii.gz", "e.nii.gz"]  # paired ones first, then label-less
    assert datalist["labeled"][0]["label"] == str(tmp_path / "labelsTr" / "a.nii.gz")
    assert_disjoint(datalist)


def test_build_datalist_dispatch(tmp_path):
    la = make_la(tmp_path / "la")
    assert len(build_datalist(la, num_labeled=2, num_val=2)["unlabeled"]) == 6
    msd = tmp_path / "msd"
    msd.mkdir()
    (msd / "dataset.json").write_text(json.dumps({"training": [{"image": "i.nii.gz", "label": "l.nii.gz"}]}))
    assert build_datalist(msd)["labeled"] == build_datalist(msd / "dataset.json")["labeled"]
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "folder" / sub).mkdir(parents=True)
        (tmp_path / "folder" / sub / "x.nii").touch()
    assert len(build_datalist(tmp_path / "folder")["labeled"]) == 1
    with pytest.raises(ValueError, match="cannot tell the dataset layout"):
        build_datalist(tmp_path / "folder" / "imagesTr")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_datalist(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- synthetic data

SYNTH = {"num_cases": 5, "num_labeled": 2, "num_val": 1, "shape": (40, 40, 32), "seed": 3}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", **SYNTH)


def read_case(root, i):
    name = f"case_{i:03d}.nii.gz"
    return [np.asanyarray(nib.load(root / d / name).dataobj) for d in ("imagesTr", "labelsTr")]


def test_synthetic_structure(synthetic):
    root = synthetic.parent
    spec = json.loads(synthetic.read_text())
    assert [i["image"] for i in spec["training"]] == ["./imagesTr/case_000.nii.gz", "./imagesTr/case_001.nii.gz"]
    assert all(set(i) == {"image", "label"} for i in spec["training"] + spec["validation"])
    assert spec["unlabeled"] == [{"image": f"./imagesTr/case_00{i}.nii.gz"} for i in (2, 3)]
    assert [i["label"] for i in spec["validation"]] == ["./labelsTr/case_004.nii.gz"]
    assert len(list((root / "labelsTr").glob("*.nii.gz"))) == 5  # every case has a label on disk
    shapes = set()
    for i in range(5):
        image, label = read_case(root, i)
        assert image.shape == label.shape and label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
        assert abs(image.mean()) < 1e-2 and abs(image.std() - 1) < 1e-2 and 0.01 < label.mean() < 0.3
        shapes.add(image.shape)
    assert len(shapes) > 1
    assert nib.load(root / "imagesTr" / "case_000.nii.gz").header.get_zooms() == (1.0, 1.0, 1.0)
    assert [p.name for p in root.parent.iterdir()] == ["data"]  # no temporary folder left


def test_synthetic_deterministic_and_idempotent(synthetic, tmp_path):
    again = make_synthetic_dataset(tmp_path / "again", **SYNTH)
    for i in range(5):
        for a, b in zip(read_case(synthetic.parent, i), read_case(again.parent, i)):
            np.testing.assert_array_equal(a, b)
    other = make_synthetic_dataset(tmp_path / "other", **{**SYNTH, "num_cases": 3, "seed": 4})
    assert read_case(other.parent, 0)[0].shape != read_case(again.parent, 0)[0].shape
    files = [again, again.parent / "imagesTr" / "case_000.nii.gz"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert make_synthetic_dataset(again.parent, **SYNTH) == again
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_synthetic_refuses_foreign_folder(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(FileExistsError, match="no dataset.json"):
        make_synthetic_dataset(tmp_path, **SYNTH)
    with pytest.raises(ValueError, match="num_labeled"):
        make_synthetic_dataset(tmp_path / "bad", num_cases=3, num_labeled=2, num_val=2)


def test_synthetic_preflight(synthetic):
    datalist = build_datalist(synthetic.parent)
    assert [len(datalist[s]) for s in ("labeled", "unlabeled", "validation")] == [2, 2, 1]
    summary = preflight(datalist, num_classes=2, patch_size=(32, 32, 24))
    assert summary["label_values"] == [0, 1] and summary["smaller_than_patch"] == 0


# ---------------------------------------------------------------------------------------------- preflight


def nifti_case(root, name, image=None, label=None, shape=(8, 8, 6)):
    """A datalist item of NIfTI files under root/imagesTr and root/labelsTr."""
    image = np.zeros(shape, np.float32) if image is None else image
    label = (np.arange(np.prod(shape)).reshape(shape) % 2).astype(np.uint8) if label is None else label
    return {
        "image": write_nifti(root / "imagesTr" / f"{name}.nii.gz", image),
        "label": write_nifti(root / "labelsTr" / f"{name}.nii.gz", label),
    }


def good_datalist(root):
    return {
        "labeled": [nifti_case(root, "a"), nifti_case(root, "b", shape=(10, 9, 7))],
        "unlabeled": [{"image": nifti_case(root, "u")["image"]}],
        "validation": [nifti_case(root, "v")],
    }


def test_preflight_good(tmp_path):
    summary = preflight(good_datalist(tmp_path), num_classes=2, patch_size=(8, 8, 8))
    assert summary == {
        "labeled": 2,
        "unlabeled": 1,
        "validation": 1,
        "min_shape": (8, 8, 6),
        "max_shape": (10, 9, 7),
        "label_values": [0, 1],
        "smaller_than_patch": 3,
    }


def test_preflight_h5(tmp_path):
    datalist = la_datalist(make_la(tmp_path), num_labeled=2, num_val=2)
    assert preflight(datalist, num_classes=2, patch_size=(8, 8, 8))["min_shape"] == (12, 10, 8)
    write_h5(tmp_path / "volumes" / "ID09" / "mri_norm2.h5", label=None)
    expected = r"case 'ID09/mri_norm2.h5' \(key 'label'\): cannot be read: .*no h5 dataset 'label'"
    with pytest.raises(DataError, match=expected):
        preflight(datalist, num_classes=2, patch_size=(8, 8, 8))


def overwrite(key, array):
    """Break case 'a' by overwriting its ``key`` file with ``array``."""
    return lambda item: write_nifti(Path(item[key]), array)


BROKEN = {
    "missing file": (
        lambda item: item.update(label="missing.nii.gz"),
        "case 'a.nii.gz' (key 'label'): file not found: missing.nii.gz",
    ),
    "shape mismatch": (
        overwrite("label", np.zeros((5, 8, 6), np.uint8)),
        "case 'a.nii.gz' (key 'label'): label spatial shape (5, 8, 6) differs from image spatial shape (8, 8, 6)",
    ),
    "label out of range": (
        overwrite("label", np.array([0, 1, 3, 1] * 96, np.uint8).reshape(8, 8, 6)),
        "case 'a.nii.gz' (key 'label'): label values [0, 1, 3] outside the declared classes 0..1 (num_classes=2)",
    ),
    "label equal to num_classes": (  # classes are 0..num_classes-1: the value num_classes is one too many
        overwrite("label", np.array([0, 1, 2, 1] * 96, np.uint8).reshape(8, 8, 6)),
        "case 'a.nii.gz' (key 'label'): label values [0, 1, 2] outside the declared classes 0..1 (num_classes=2)",
    ),
    "negative label": (
        overwrite("label", np.array([0, -1, 1, 1] * 96, np.int16).reshape(8, 8, 6)),
        "case 'a.nii.gz' (key 'label'): label values [-1, 0, 1] outside the declared classes 0..1 (num_classes=2)",
    ),
    "2-D image": (
        overwrite("image", np.zeros((8, 8), np.float32)),
        "case 'a.nii.gz' (key 'image'): expected a 3-D volume, found spatial shape (8, 8)",
    ),
    "many label values": (  # the first 20 are listed
        overwrite("label", (np.arange(384) % 25).astype(np.uint8).reshape(8, 8, 6)),
        f"case 'a.nii.gz' (key 'label'): label values {list(range(20))} outside the declared classes 0..1 (num_classes=2)",
    ),
    "many fractional values": (  # the first 10 are listed
        overwrite("label", (np.arange(384) % 12 + 0.5).astype(np.float32).reshape(8, 8, 6)),
        f"case 'a.nii.gz' (key 'label'): label values {[i + 0.5 for i in range(10)]} are not integers",
    ),
    "two-channel label": (
        overwrite("label", np.zeros((8, 8, 6, 2), np.uint8)),
        "case 'a.nii.gz' (key 'label'): 2 channels (shape (2, 8, 8, 6)); a label holds class indices in one channel",
    ),
    "fractional label": (
        overwrite("label", np.full((8, 8, 6), 0.5, np.float32)),
        "case 'a.nii.gz' (key 'label'): label values [0.5] are not integers",
    ),
    "nan intensity": (
        overwrite("image", np.where(np.eye(8)[:, :, None] > 0, np.nan, 0.0).repeat(6, 2)),
        "case 'a.nii.gz' (key 'image'): 48 non-finite intensities (NaN/Inf)",
    ),
    "inf intensity": (  # +Inf and -Inf (an overflowed conversion), no NaN
        overwrite("image", np.where(np.eye(8)[:, :, None] > 0, np.inf, 0.0).repeat(6, 2) * np.sign(np.arange(6) - 2.5)),
        "case 'a.nii.gz' (key 'image'): 48 non-finite intensities (NaN/Inf)",
    ),
}


@pytest.mark.parametrize("break_case, message", BROKEN.values(), ids=BROKEN.keys())
def test_preflight_errors(tmp_path, break_case, message):
    datalist = good_datalist(tmp_path)
    break_case(datalist["labeled"][0])
    with pytest.raises(DataError, match=r"^1 dataset problem\(s\)") as error:
        preflight(datalist, num_classes=2, patch_size=(8, 8, 6))
    assert message in str(error.value)


def test_preflight_collects_all_problems(tmp_path):
    datalist = good_datalist(tmp_path)
    datalist["validation"].append(datalist["labeled"].pop(0))
    datalist["labeled"] = [{"image": item["image"]} for item in datalist["labeled"]]
    datalist["unlabeled"].append({"image": datalist["validation"][0]["image"]})
    datalist["unlabeled"] += [{"image": str(tmp_path / f"gone{i}.nii.gz")} for i in range(22)]
    with pytest.raises(DataError) as error:
        preflight(datalist, num_classes=2, patch_size=(9, 8, 6), allow_pad=False)
    text = str(error.value)
    assert text.startswith("26 dataset problem(s)") and text.endswith("... and 6 more")
    assert "case 'imagesTr/v.nii.gz' is in more than one split (unlabeled, validation)" in text
    assert "no labeled case: no item of 'labeled' has key 'label'" in text
    assert "case 'imagesTr/b.nii.gz' (key 'image'): spatial shape (10, 9, 7)" not in text
    assert "case 'imagesTr/u.nii.gz' (key 'image'): spatial shape (8, 8, 6) smaller than patch_size (9, 8, 6)" in text
    assert "case 'gone0.nii.gz' (key 'image'): file not found" in text


def test_preflight_reports_every_broken_file_of_a_case(tmp_path):
    """Both files of a case are checked even when the first is broken, for each kind of break."""
    datalist = good_datalist(tmp_path)
    a, b, v = datalist["labeled"][0], datalist["labeled"][1], datalist["validation"][0]
    a.update(image=str(tmp_path / "gone_image.nii.gz"), label=str(tmp_path / "gone_label.nii.gz"))
    for key in ("image", "label"):
        Path(b[key]).write_bytes(b"not a nifti")
        write_nifti(Path(v[key]), np.zeros((8, 6), np.float32))
    with pytest.raises(DataError) as error:
        preflight(datalist, num_classes=2, patch_size=(8, 8, 6))
    lines = str(error.value).splitlines()
    assert lines[0] == "6 dataset problem(s) found before training:"
    for key in ("image", "label"):  # a case is named by its image file
        assert f"  case 'gone_image.nii.gz' (key '{key}'): file not found: {a[key]}" in lines
        assert any(line.startswith(f"  case 'imagesTr/b.nii.gz' (key '{key}'): cannot be read: ") for line in lines)
        assert f"  case 'imagesTr/v.nii.gz' (key '{key}'): expected a 3-D volume, found spatial shape (8, 6)" in lines


@pytest.mark.parametrize(
    "error, expected",
    [
        (ValueError("bad channel\nsecond line"), "ValueError: bad channel"),
        (RuntimeError("wrapped"), "RuntimeError: wrapped"),
        (KeyError(), "KeyError: "),
    ],
)
def test_preflight_names_the_root_cause_of_a_transform_failure(tmp_path, error, expected):
    def transform(data):
        try:
            raise error
        except Exception as e:  # as MONAI wraps a transform's error
            raise RuntimeError("applying transform <lambda>") from e

    with pytest.raises(DataError) as info:
        preflight(good_datalist(tmp_path), num_classes=2, patch_size=(8, 8, 6), transform=transform)
    lines = str(info.value).splitlines()
    assert lines[0] == "4 dataset problem(s) found before training:"  # every case with an image
    assert f"  case 'a.nii.gz' (key 'image'): dataset_transform failed: {expected}" in lines


def test_preflight_readers(tmp_path):
    """A ``{key: reader}`` mapping (instances or names) reads each key its way, and a reader that does not take a
    file's suffix (inference's ``H5Reader``) leaves that file to MONAI's readers."""
    root = tmp_path / "h5"
    items = []
    for i in range(3):
        path = root / f"c{i}.h5"
        write_h5(path, seed=i, img=np.ones((12, 10, 8), np.float32), seg=np.ones((12, 10, 8), np.uint8), label=None)
        items.append({"image": str(path), "label": str(path)})
    datalist = {"labeled": items[:1], "unlabeled": [{"image": items[1]["image"]}], "validation": items[2:]}
    renamed = {"image": H5Reader(dataset="img"), "label": H5Reader(dataset="seg")}
    assert preflight(datalist, num_classes=2, patch_size=(8, 8, 8), reader=renamed)["label_values"] == [1]
    by_name = {"image": "monai_dualssl.readers.H5Reader", "label": H5Reader(dataset="seg")}  # a name reads "image"
    assert preflight(datalist, num_classes=2, patch_size=(8, 8, 8), reader=by_name)["label_values"] == [1]
    with pytest.raises(DataError, match="no h5 dataset 'label'"):
        preflight(datalist, num_classes=2, patch_size=(8, 8, 8))  # the default reads dataset 'label'
    nifti = good_datalist(tmp_path / "nifti")
    assert preflight(nifti, num_classes=2, patch_size=(8, 8, 8), reader=H5Reader())["labeled"] == 2


def test_preflight_problem_list_and_its_limit(tmp_path):
    """The error lists one problem a line, at most 20, then how many more."""
    datalist = good_datalist(tmp_path)
    datalist["labeled"].append({"label": "x.nii.gz", "other": 1})  # no image: named by its index and keys
    datalist["validation"].append({"image": datalist["labeled"][1]["image"], "label": datalist["labeled"][1]["label"]})
    with pytest.raises(DataError) as error:
        preflight(datalist, num_classes=2, patch_size=(8, 8, 6))
    assert str(error.value) == (
        "2 dataset problem(s) found before training:\n"
        "  item 2 of 'labeled' has no key 'image' (keys found: ['label', 'other'])\n"
        "  case 'b.nii.gz' is in more than one split (labeled, validation)"
    )
    for n, tail in ((20, "not found: gone19.nii.gz"), (21, "... and 1 more")):
        datalist = good_datalist(tmp_path / str(n))
        datalist["unlabeled"] = [{"image": f"gone{i}.nii.gz"} for i in range(n)]
        with pytest.raises(DataError) as error:
            preflight(datalist, num_classes=2, patch_size=(8, 8, 6))
        lines = str(error.value).splitlines()
        assert lines[0] == f"{n} dataset problem(s) found before training:" and len(lines) == 21 + (n > 20)
        assert lines[-1].endswith(tail)


def test_preflight_custom_keys_and_missing_splits(tmp_path):
    """Other item keys than image/label are honoured (the split-overlap check too); a datalist may omit splits."""
    good = good_datalist(tmp_path)
    renamed = {split: [{"img" if k == "image" else "seg": v for k, v in item.items()} for item in items]
               for split, items in good.items()}
    summary = preflight(renamed, num_classes=2, patch_size=(8, 8, 6), image_key="img", label_key="seg")
    assert summary["labeled"] == 2 and summary["label_values"] == [0, 1]
    assert summary["smaller_than_patch"] == 0  # a volume exactly the patch size needs no padding
    renamed["validation"].append(dict(renamed["labeled"][0]))
    with pytest.raises(DataError) as error:
        preflight(renamed, num_classes=2, patch_size=(8, 8, 6), image_key="img", label_key="seg")
    assert "case 'a.nii.gz' is in more than one split (labeled, validation)" in str(error.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a datalist with validation cases gets no warning
        summary = preflight({"labeled": good["labeled"], "validation": good["validation"]}, 2, (8, 8, 6))
    assert (summary["labeled"], summary["unlabeled"], summary["validation"]) == (2, 0, 1)
    with pytest.warns(UserWarning) as record:
        preflight({"labeled": good["labeled"]}, 2, (8, 8, 6))
    assert [str(w.message) for w in record] == [
        "preflight: no validation case: training will validate nothing and so write no model.pt (only its "
        "checkpoints); set num_val (e.g. --num_val 4) or list 'validation' items in dataset.json."
    ]


def test_preflight_label_values_come_from_the_labels_only(tmp_path):
    """Cases without a label (unlabeled) add no value to ``label_values``."""
    datalist = good_datalist(tmp_path)
    for item in datalist["labeled"] + datalist["validation"]:
        write_nifti(Path(item["label"]), np.full(nib.load(item["image"]).shape, 1, np.uint8))
    assert preflight(datalist, num_classes=2, patch_size=(8, 8, 8))["label_values"] == [1]


@pytest.mark.parametrize("n, hint", [(3, 1), (10, 2)])
def test_unlabeled_items_message(n, hint):
    expected = (
        f"no unlabeled case: all {n} cases with a label are labeled, and semi-supervised training needs unlabeled "
        f"ones. Set num_labeled below {n} (e.g. --num_labeled {hint}) to train the rest as unlabeled, list "
        "'unlabeled' items in dataset.json, or merge supervised.yaml to train on the labeled cases only."
    )
    for datalist in ({"labeled": [{}] * n, "unlabeled": []}, {"labeled": [{}] * n}):  # empty or missing split
        with pytest.raises(DataError) as error:
            unlabeled_items(datalist)
        assert str(error.value) == expected


# ---------------------------------------------------------------------------------------------- inference inputs


def test_check_inputs_takes_one_channel_volumes_by_default(tmp_path):
    write_h5(tmp_path / "a.h5")
    assert check_inputs([str(tmp_path / "a.h5")]) == {"readable": [str(tmp_path / "a.h5")], "failed": {}}


def test_check_inputs_reads_slice_patterns_and_names_one_without_files_or_with_a_gap(tmp_path):
    for n in (1, 2, 4):
        write_h5(tmp_path / f"case_slice_{n}.h5", shape=(10, 8), seed=n)
        write_h5(tmp_path / f"whole_slice_{n}.h5", shape=(10, 8), seed=n)
    write_h5(tmp_path / "whole_slice_3.h5", shape=(10, 8))
    ok, none, gap = (str(tmp_path / f"{case}_slice_*.h5") for case in ("whole", "other", "case"))
    with pytest.warns(UserWarning, match="not segmented"):
        checked = check_inputs([ok, none, gap])
    assert checked == {"readable": [ok], "failed": {
        none: f"no slice file matches {none}",
        gap: f"slice pattern {gap}: slices 1..4 found but [3] missing; a volume needs every slice."}}


def test_check_inputs_reads_with_the_given_reader(tmp_path):
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f.create_dataset("scan", data=np.zeros((12, 10, 8), np.float32))  # no "image" dataset
    path = str(tmp_path / "scan.h5")
    assert check_inputs([path], reader=H5Reader(dataset="scan"))["readable"] == [path]
    with pytest.warns(UserWarning):
        assert check_inputs([path])["failed"][path].startswith("cannot be read: ")


def test_check_inputs_reports_every_problem_of_a_file(tmp_path):
    image = np.zeros((12, 10, 8), np.float32)
    image[0, 0, 0] = np.nan
    write_h5(tmp_path / "a.h5", image=image)
    two = lambda d: {**d, "image": np.concatenate([d["image"], d["image"]])}  # noqa: E731
    with pytest.warns(UserWarning):
        failed = check_inputs([str(tmp_path / "a.h5")], transform=two)["failed"]
    assert failed == {str(tmp_path / "a.h5"): (
        "2 channels after dataset_transform (shape (2, 12, 10, 8)); the networks take 1: select channels in "
        "dataset_transform (as brats.yaml does); 2 non-finite intensities (NaN/Inf)")}


# ---------------------------------------------------------------------------------------------- reliability

TINY_SYNTH = {"num_cases": 2, "num_labeled": 1, "num_val": 0, "shape": (32, 32, 32), "seed": 5}
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
MULTI_GPU = "multi_gpu_train.yaml"


def snapshot(root):
    """Every file under ``root`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*"))}


def test_synthetic_never_writes_into_a_foreign_folder(tmp_path):
    la = make_la(tmp_path / "la", ids=IDS[:3])  # a real-data folder: train.list and h5 cases
    msd = tmp_path / "msd"  # the user's own MSD dataset
    write_nifti(msd / "imagesTr" / "p1.nii.gz", np.zeros((4, 4, 4), np.float32))
    (msd / "dataset.json").write_text(json.dumps({"name": "MyHeart", "training": []}))
    for root, listed in ((la, "train.list, volumes/"), (msd, "dataset.json, imagesTr/")):
        before = snapshot(root)
        for overwrite in (False, True):
            with pytest.raises(FileExistsError) as error:
                make_synthetic_dataset(root, overwrite=overwrite, **TINY_SYNTH)
            assert str(error.value).startswith(f"{root}: refusing to write the synthetic demo dataset")
            assert f"({listed})" in str(error.value) and "nothing was written" in str(error.value)
        assert snapshot(root) == before


def test_synthetic_overwrite_replaces_only_its_own_output(tmp_path):
    root = tmp_path / "demo"
    target = make_synthetic_dataset(root, **TINY_SYNTH)
    stamp = target.stat().st_mtime_ns
    assert make_synthetic_dataset(root, overwrite=True, **TINY_SYNTH) == target  # its own output: regenerated
    assert target.stat().st_mtime_ns != stamp
    foreign = write_nifti(root / "imagesTr" / "patient_07.nii.gz", np.ones((4, 4, 4), np.float32))
    (root / "notes.txt").write_text("mine")
    before = snapshot(root)
    with pytest.raises(FileExistsError, match=re.escape("(imagesTr/patient_07.nii.gz, notes.txt)")):
        make_synthetic_dataset(root, overwrite=True, **TINY_SYNTH)
    with pytest.raises(FileExistsError, match="refusing to write"):  # reusing it is refused too
        make_synthetic_dataset(root, **TINY_SYNTH)
    assert snapshot(root) == before and Path(foreign).is_file()


def test_msd_datalist_names_the_file_and_the_keys(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"training": [{"img": "a.nii.gz", "seg": "a_seg.nii.gz"}]}))
    expected = f"{path}: 1 'training' item(s) lack the key(s) ['image', 'label'] that MSD 'training' items need: "
    with pytest.raises(ValueError, match=re.escape(expected + "item 0 has keys ['img', 'seg'].")):
        msd_datalist(path)
    training = [{"image": f"c{i}.nii.gz", "label": f"l{i}.nii.gz"} for i in range(2)]
    path.write_text(json.dumps({"training": training, "validation": [{"image": "v.nii.gz"}]}))
    with pytest.raises(ValueError, match=re.escape("'validation' item(s) lack the key(s) ['image', 'label']")):
        msd_datalist(path)
    path.write_text(json.dumps({"training": training + ["u.nii.gz"]}))
    hint = "item 2 has keys ['image'] (list image-only items under 'unlabeled')"
    with pytest.raises(ValueError, match=re.escape(hint)):
        msd_datalist(path)


def test_preflight_multichannel_image(tmp_path):
    datalist = good_datalist(tmp_path)
    write_nifti(Path(datalist["labeled"][0]["image"]), np.zeros((8, 8, 6, 4), np.float32))  # 4 channels (MSD BraTS)
    with pytest.raises(DataError, match=r"^1 dataset problem\(s\)") as error:
        preflight(datalist, num_classes=2, patch_size=(16, 16, 16))
    assert "case 'a.nii.gz' (key 'image'): 4 channels (shape (4, 8, 8, 6)); the networks take 1" in str(error.value)
    brats = ConfigParser()  # brats.yaml's dataset_transform selects FLAIR: then the case is fine
    brats.read_config([str(REPO_CONFIGS / "train.yaml"), str(REPO_CONFIGS / "brats.yaml")])
    transform = brats.get_parsed_content("dataset_transform")
    assert preflight(datalist, num_classes=2, patch_size=(16, 16, 16), transform=transform)["labeled"] == 2
    with pytest.raises(DataError, match=re.escape("'a.nii.gz' (key 'image'): 1 channel after dataset_transform")):
        preflight(datalist, num_classes=2, patch_size=(16, 16, 16), transform=transform, in_channels=4)


def test_preflight_validation_case_without_label(tmp_path):
    datalist = good_datalist(tmp_path)
    datalist["validation"] = [{"image": datalist["validation"][0]["image"]}]
    with pytest.raises(DataError) as error:
        preflight(datalist, num_classes=2, patch_size=(16, 16, 16))
    assert "case 'v.nii.gz' (split 'validation'): no key 'label'; validation cases need a label" in str(error.value)


@pytest.mark.parametrize("split", ["labeled", "validation"])
def test_preflight_every_label_empty(tmp_path, split):
    datalist = good_datalist(tmp_path)
    for item in datalist[split]:
        write_nifti(Path(item["label"]), np.zeros(nib.load(item["image"]).shape, np.uint8))
    with pytest.raises(DataError, match=r"^1 dataset problem\(s\)") as error:
        preflight(datalist, num_classes=2, patch_size=(16, 16, 16))
    n = len(datalist[split])
    reason = {
        "labeled": "the networks would learn background only",
        "validation": "the validation Dice is undefined, so the best model would stay the one of the first validation",
    }[split]
    expected = (f"every {split} label (key 'label', {n} cases) is empty (background only{{}}): {reason}; check the "
                "label files and the label mapping")
    assert str(error.value).splitlines()[1] == "  " + expected.format("")
    with pytest.raises(DataError) as error:  # with a dataset_transform, the message says the labels were transformed
        preflight(datalist, num_classes=2, patch_size=(16, 16, 16), transform=lambda data: data)
    assert str(error.value).splitlines()[1] == "  " + expected.format(" after dataset_transform")


def test_no_unlabeled_or_validation_cases_are_reported(tmp_path):
    for name in ("a", "b", "c"):  # every image has its label, and no num_labeled / num_val is given
        nifti_case(tmp_path, name)
    datalist = build_datalist(tmp_path)
    assert datalist["unlabeled"] == [] and datalist["validation"] == []
    with pytest.warns(UserWarning) as record:
        preflight(datalist, num_classes=2, patch_size=(16, 16, 16))
    messages = [str(w.message) for w in record]
    assert any(m.startswith("preflight: no validation case") and "no model.pt" in m for m in messages)
    with pytest.raises(DataError, match="no unlabeled case: all 3 cases with a label are labeled.*--num_labeled"):
        unlabeled_items(datalist)
    assert unlabeled_items({"unlabeled": [{"image": "x"}]}) == [{"image": "x"}]


def test_train_yaml_without_unlabeled_cases_says_why(tmp_path):
    for name in ("a", "b", "c", "d"):
        nifti_case(tmp_path / "data", name, shape=(16, 16, 16))
    overrides = tiny_overrides(tmp_path / "data", tmp_path, num_val=1, patch_size=[16, 16, 16])
    wf = ConfigWorkflow(config_file=str(CONFIGS / "train.yaml"), logging_file=False, workflow_type="train", **overrides)
    wf.initialize()
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("train#trainer")
    error = info.value
    while not isinstance(error, DataError):
        error = error.__cause__ or error.__context__
    assert "no unlabeled case" in str(error) and "supervised.yaml" in str(error)


def test_preflight_patch_size_divisible_by_16(tmp_path):
    expected = (
        "patch_size [40, 48, 20]: every size must be divisible by 16 (the networks downsample 4 times), found 40, 20; "
        "nearest valid patch sizes: [32, 48, 16] or [48, 48, 32]."
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        preflight(good_datalist(tmp_path), num_classes=2, patch_size=(40, 48, 20), patch_divisor=16)


def test_preflight_patch_size_divisible_per_axis(tmp_path):
    expected = (
        "patch_size [96, 96, 10]: every size must be divisible by [16, 16, 4] along its axes (the product of the "
        "networks' strides along each), found 10; nearest valid patch sizes: [96, 96, 8] or [96, 96, 12]."
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        preflight(good_datalist(tmp_path), num_classes=2, patch_size=(96, 96, 10), patch_divisor=[16, 16, 4])
    with pytest.raises(ValueError, match=re.escape("patch_divisor [16, 4]: expected one number or 3")):
        preflight(good_datalist(tmp_path), num_classes=2, patch_size=(96, 96, 8), patch_divisor=[16, 4])


def test_train_configs_preflight_patch_size(tiny_dataset, tmp_path):
    """train.yaml's preflight stops a patch size the networks cannot take before any data is cached."""
    from conftest import tiny_overrides

    parser = ConfigParser()
    parser.read_config(str(REPO_CONFIGS / "train.yaml"))
    parser.update(tiny_overrides(tiny_dataset, tmp_path, patch_size=[40, 40, 16]))
    index = next(i for i, line in enumerate(parser["initialize"]) if "preflight" in line)
    with pytest.raises(RuntimeError) as error:  # the config's "Failed to evaluate", from preflight's ValueError
        parser.get_parsed_content(f"initialize#{index}")
    assert "nearest valid patch sizes: [32, 32, 16] or [48, 48, 16]" in str(error.value.__cause__)
    lines = [ConfigParser.load_config_file(str(REPO_CONFIGS / f))["initialize"] for f in ("train.yaml", MULTI_GPU)]
    calls = [line.split("monai_dualssl.preflight", 1)[1] for line in lines[0] + lines[1] if "preflight" in line]
    assert len(calls) == 2 and calls[0] == calls[1]  # both configs check the same way
