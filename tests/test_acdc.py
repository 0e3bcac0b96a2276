"""ACDC in the field's h5 layout: slice files stacked into volumes, the datalist and its splits, the configs
(acdc.yaml, acdc_cpu.yaml, eval_split), a tiny 4-class training and test-split evaluation on a generated folder,
and the real folder when present (``ACDC_DIR``; skipped without it)."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import LoadImage

from conftest import CONFIGS, TINY_NET, heart_label, require_acdc, tiny_overrides, write_fake_acdc
from monai_dualssl import (
    DataError,
    H5Reader,
    acdc_datalist,
    build_datalist,
    is_slice_pattern,
    preflight,
    slice_files,
    split_items,
)

ACDC_CONFIGS = [str(CONFIGS / f) for f in ("train.yaml", "acdc.yaml", "acdc_cpu.yaml")]
TRANSPOSE = (2, 1, 0)
SPACING = (1.5, 1.5, 10.0)


def readers(transpose=TRANSPOSE, spacing=SPACING) -> dict:
    return {key: H5Reader(dataset=key, spacing=spacing, transpose=transpose) for key in ("image", "label")}


def load(path, key="image", **kwargs):
    return LoadImage(reader=H5Reader(dataset=key, **kwargs), image_only=True)(path)


@pytest.fixture(scope="module")
def fake_acdc(tmp_path_factory):
    return write_fake_acdc(tmp_path_factory.mktemp("acdc"))


# ---------------------------------------------------------------------------------------------- slice files


def write_slices(folder, name, numbers, shape=(3, 4)):
    """Slice files ``<name>_slice_<n>.h5`` whose image is filled with n (written in the given order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        with h5py.File(folder / f"{name}_slice_{n}.h5", "w") as f:
            f["image"] = np.full(shape, n, np.float32)
            f["label"] = np.full(shape, n % 4, np.uint8)


def test_slice_files_in_numeric_order(tmp_path):
    """slice_2 before slice_10 whatever order the files were written in; other files beside are not slices."""
    write_slices(tmp_path, "case", [10, 3, 1, 12, 2, 11, 5, 4, 9, 6, 8, 7])
    write_slices(tmp_path, "case_b", [1])            # 'case_b_slice_1.h5' does not match 'case_slice_*.h5'
    (tmp_path / "case_slice_2_mask.h5").touch()     # '*' must be a number
    (tmp_path / "case_slice_x.h5").touch()
    files = slice_files(tmp_path / "case_slice_*.h5")
    assert [os.path.basename(f) for f in files] == [f"case_slice_{n}.h5" for n in range(1, 13)]
    assert slice_files(tmp_path / "other_slice_*.h5") == []
    assert is_slice_pattern(tmp_path / "case_slice_*.h5") and not is_slice_pattern(tmp_path / "case.h5")


def test_slice_files_errors(tmp_path):
    write_slices(tmp_path, "gap", [1, 2, 4])
    with pytest.raises(ValueError, match=r"slices 1\.\.4 found but \[3\] missing"):
        slice_files(tmp_path / "gap_slice_*.h5")
    write_slices(tmp_path, "twice", [1, 2])
    shutil.copy(tmp_path / "twice_slice_2.h5", tmp_path / "twice_slice_02.h5")
    with pytest.raises(ValueError, match="same slice number"):
        slice_files(tmp_path / "twice_slice_*.h5")
    with pytest.raises(ValueError, match="exactly one"):
        slice_files(tmp_path / "a_*_slice_*.h5")


def test_reader_stacks_slices_in_numeric_order_and_moves_the_slice_axis_last(tmp_path):
    write_slices(tmp_path, "case", [10, 3, 1, 2, 11, 5, 4, 9, 6, 8, 7])
    stacked = load(str(tmp_path / "case_slice_*.h5"))
    assert stacked.shape == (11, 3, 4) and stacked[:, 0, 0].tolist() == list(range(1, 12))
    moved = load(str(tmp_path / "case_slice_*.h5"), transpose=TRANSPOSE, spacing=SPACING)
    assert moved.shape == (4, 3, 11) and moved[0, 0, :].tolist() == list(range(1, 12))
    assert np.allclose(np.diag(moved.affine), [1.5, 1.5, 10.0, 1.0])
    assert moved.meta["filename_or_obj"] == str(tmp_path / "case_slice_*.h5")
    label = load(str(tmp_path / "case_slice_*.h5"), key="label", transpose=TRANSPOSE)
    assert label.shape == (4, 3, 11) and label[0, 0, :].tolist() == [n % 4 for n in range(1, 12)]


def test_stacked_slices_equal_the_volume_file(tmp_path):
    """A volume written whole and as slice files reads the same, in the same axis order."""
    label = heart_label((9, 20, 16), seed=4)
    with h5py.File(tmp_path / "whole.h5", "w") as f:
        f["label"] = label
    for n in np.random.default_rng(0).permutation(9):
        with h5py.File(tmp_path / f"split_slice_{n + 1}.h5", "w") as f:
            f["label"] = label[n]
    whole = load(str(tmp_path / "whole.h5"), key="label", transpose=TRANSPOSE)
    split = load(str(tmp_path / "split_slice_*.h5"), key="label", transpose=TRANSPOSE)
    assert whole.shape == split.shape == (16, 20, 9)
    assert np.array_equal(np.asarray(whole), np.asarray(split))
    assert np.array_equal(np.asarray(whole), label.transpose(2, 1, 0))


def test_reader_errors(tmp_path):
    write_slices(tmp_path, "case", [1, 2])
    write_slices(tmp_path, "odd", [1], shape=(3, 4))
    write_slices(tmp_path, "odd", [2], shape=(3, 5))
    with pytest.raises(FileNotFoundError, match="no slice file matches"):
        H5Reader().read(str(tmp_path / "none_slice_*.h5"))
    reader = H5Reader()
    with pytest.raises(ValueError, match=r"the slices differ in shape \(odd_slice_1.h5: \(3, 4\), odd_slice_2.h5: \(3, 5\)\)"):
        reader.get_data(reader.read(str(tmp_path / "odd_slice_*.h5")))
    with pytest.raises(ValueError, match="permutation"):
        H5Reader(transpose=(0, 0, 1))
    two_axes = H5Reader(transpose=(1, 0))
    with pytest.raises(ValueError, match=r"expected 2 axes \(one per transpose entry \(1, 0\)\)"):
        two_axes.get_data(two_axes.read(str(tmp_path / "case_slice_*.h5")))
    files = reader.read([str(tmp_path / "case_slice_*.h5")])
    reader.get_data(files)
    assert all(not f.id.valid for f in files[0].files)  # every slice file closed


# ---------------------------------------------------------------------------------------------- datalist


def test_acdc_datalist_splits(fake_acdc):
    d = acdc_datalist(fake_acdc, num_labeled=2)
    assert {k: len(v) for k, v in d.items()} == {"labeled": 2, "unlabeled": 4, "validation": 2, "test": 2}
    data = fake_acdc / "data"
    assert d["labeled"] == [{"image": str(data / f"p1_frame0{i}_slice_*.h5"), "label": str(data / f"p1_frame0{i}_slice_*.h5")}
                            for i in (1, 2)]
    assert d["unlabeled"][0] == {"image": str(data / "p2_frame01_slice_*.h5")}  # no label
    assert d["validation"] == [{"image": str(data / f"p4_frame0{i}.h5"), "label": str(data / f"p4_frame0{i}.h5")} for i in (1, 2)]
    assert [item["image"] for item in d["test"]] == [str(data / "p5_frame01.h5"), str(data / "p5_frame02.h5")]
    assert build_datalist(fake_acdc, num_labeled=2) == d  # the layout is recognised
    # validation from the end of train.list instead of val.list, no test split
    alt = acdc_datalist(fake_acdc, num_labeled=2, num_val=2, val_list=None, test_list=None)
    assert [len(alt[k]) for k in ("labeled", "unlabeled", "validation")] == [2, 2, 2] and "test" not in alt
    assert alt["validation"][0]["image"] == str(data / "p3_frame01_slice_*.h5")
    assert len(acdc_datalist(fake_acdc, num_labeled=None)["labeled"]) == 6


def test_acdc_datalist_errors(fake_acdc, tmp_path):
    root = write_fake_acdc(tmp_path / "broken")
    (root / "test.list").write_text("p5_frame01\nnope_frame01\n")
    with pytest.raises(FileNotFoundError, match=r"1 listed case\(s\) have neither .*'nope_frame01'"):
        acdc_datalist(root, num_labeled=2)
    (root / "test.list").write_text("p1_frame01\n")  # a training case
    with pytest.raises(ValueError, match=r"disjoint: case 'p1_frame01_slice_\*.h5' is in more than one split \(labeled, test\)"):
        acdc_datalist(root, num_labeled=2)
    with pytest.raises(FileNotFoundError, match="case list file not found"):
        acdc_datalist(fake_acdc, num_labeled=2, val_list="missing.list")
    with pytest.raises(ValueError, match="at most the 6 labeled cases"):
        acdc_datalist(fake_acdc, num_labeled=7)
    (root / "test.list").write_text("p5_frame01\n")
    (root / "data" / "p2_frame01_slice_3.h5").unlink()  # a gap: listed, preflight names it (below)
    assert acdc_datalist(root, num_labeled=2)["unlabeled"][0]["image"] == str(root / "data" / "p2_frame01_slice_*.h5")


def test_split_items(fake_acdc):
    d = acdc_datalist(fake_acdc, num_labeled=2)
    assert split_items(d, "test") == d["test"] and split_items(d, "validation") == d["validation"]
    with pytest.raises(ValueError, match="no 'test' split .*it has: labeled, unlabeled, validation"):
        split_items({k: d[k] for k in ("labeled", "unlabeled", "validation")}, "test")
    with pytest.raises(ValueError, match="'validation' split is empty"):
        split_items({**d, "validation": []}, "validation")


def test_preflight_reads_slice_stacks_with_the_config_readers(fake_acdc, tmp_path):
    d = acdc_datalist(fake_acdc, num_labeled=2)
    summary = preflight(d, num_classes=4, patch_size=(32, 32, 16), patch_divisor=16, reader=readers())
    assert summary["label_values"] == [0, 1, 2, 3] and summary["min_shape"] == (36, 40, 6)
    assert summary["max_shape"] == (36, 40, 12) and summary["labeled"] == 2
    with pytest.raises(DataError, match="outside the declared classes 0..2"):
        preflight(d, num_classes=3, patch_size=(32, 32, 16), reader=readers())
    root = write_fake_acdc(tmp_path / "gap")
    (root / "data" / "p3_frame02_slice_2.h5").unlink()
    (root / "data" / "p1_frame01_slice_5.h5").unlink()
    with pytest.raises(DataError) as error:  # every broken case at once, by name
        preflight(acdc_datalist(root, num_labeled=2), num_classes=4, patch_size=(32, 32, 16), reader=readers())
    lines = str(error.value).splitlines()
    assert lines[0] == "3 dataset problem(s) found before training:"  # image and label of the labeled case
    assert "case 'p1_frame01_slice_*.h5' (key 'image'): slice pattern " in lines[1] and "[5] missing" in lines[1]
    assert "case 'p1_frame01_slice_*.h5' (key 'label'): slice pattern " in lines[2]
    assert "case 'p3_frame02_slice_*.h5' (key 'image'): slice pattern " in lines[3] and "[2] missing" in lines[3]


# ---------------------------------------------------------------------------------------------- configs


def parsed(*extra_files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(ACDC_CONFIGS + [str(CONFIGS / f) for f in extra_files])
    parser.update(overrides)
    return parser


def test_acdc_configs(fake_acdc):
    p = parsed(dataset_dir=str(fake_acdc), num_labeled=2)
    assert p.get_parsed_content("num_classes") == 4 and p.get_parsed_content("patch_size") == [96, 96, 16]
    assert p.get_parsed_content("label_names") == {"right_ventricle": 1, "myocardium": 2, "left_ventricle": 3}
    datalist = p.get_parsed_content("datalist")
    assert {k: len(v) for k, v in datalist.items()} == {"labeled": 2, "unlabeled": 4, "validation": 2, "test": 2}
    item = p.get_parsed_content("train#preprocessing")(datalist["labeled"][0])
    assert item["image"].shape == (1, 96, 96, 16) and item["label"].shape == (1, 96, 96, 16)  # padded to the patch
    assert set(np.unique(np.asarray(item["label"]))) == {0, 1, 2, 3}
    validation = p.get_parsed_content("validate#preprocessing")(datalist["validation"][0])
    assert validation["image"].shape == (1, 36, 40, 10)  # (W, H, slices): the slice axis last
    e = parsed("evaluate.yaml", dataset_dir=str(fake_acdc), num_labeled=2)
    assert [x["image"] for x in e.get_parsed_content("dataset#data")] == [x["image"] for x in datalist["test"]]
    case = e.get_parsed_content("preprocessing")(datalist["test"][0])
    assert np.allclose(np.diag(case["image"].affine), [1.5, 1.5, 10.0, 1.0])
    # entropies ranked within each pseudo-class (the structures keep pseudo-labels and prototypes)
    assert p.get_parsed_content("train#cps_loss").filter_scope == "class" == p.get_parsed_content("train#proto_loss").filter_scope
    # the networks keep the slice axis for two levels, and the preflight checks patches against their strides
    assert p.get_parsed_content("network_def").net_a.divisors == [16, 16, 4] == p.get_parsed_content("network_def").net_b.divisors
    index = next(i for i, line in enumerate(p["initialize"]) if "preflight" in line)
    for patch, error in (([96, 96, 12], None), ([96, 96, 10], "[16, 16, 4] along its axes")):
        q = parsed(dataset_dir=str(fake_acdc), num_labeled=2, patch_size=patch)
        if error is None:
            q.get_parsed_content(f"initialize#{index}")
        else:
            with pytest.raises(RuntimeError) as info:  # the config's "Failed to evaluate", from preflight's ValueError
                q.get_parsed_content(f"initialize#{index}")
            assert error in str(info.value.__cause__)
    # the LA / demo configs keep evaluating their validation split
    la = ConfigParser()
    la.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")])
    assert la.get_parsed_content("eval_split") == "validation" and la.get_parsed_content("h5_transpose") is None


def test_labeled_crops_are_centred_on_foreground_half_the_time(tmp_path):
    """acdc.yaml's labeled stream crops with RandCropByPosNegLabeld (pos 1, neg 1), the unlabeled one at random:
    on a 300 x 300 stack whose only labeled voxels are a 4 x 4 x 1 corner patch, about half the labeled crops
    hold it, random crops (almost) never do."""
    root = write_fake_acdc(tmp_path / "acdc")
    for n in range(1, 13):  # p1_frame01: 12 slices of 300 x 300, foreground only at one corner of slice 6
        label = np.zeros((300, 300), np.uint8)
        if n == 6:
            label[10:14, 10:14] = 3
        with h5py.File(root / "data" / f"p1_frame01_slice_{n}.h5", "w") as f:
            f["image"], f["label"] = np.random.default_rng(n).random((300, 300), dtype=np.float32), label
    p = parsed(dataset_dir=str(root), num_labeled=1, cache_rate=0.0)
    labeled, unlabeled = p.get_parsed_content("train#dataset"), p.get_parsed_content("train#unlabeled_dataset")
    crops = [[type(t).__name__ for t in d.transform.transforms if "Crop" in type(t).__name__] for d in (labeled, unlabeled)]
    assert crops == [["RandCropByPosNegLabeld"], ["RandSpatialCropd"]]
    random_crop = p.get_parsed_content("train#preprocessing")
    labeled.transform.set_random_state(seed=0)
    random_crop.set_random_state(seed=0)
    centred = [labeled[0][0] for _ in range(20)]
    assert all(c["image"].shape == (1, 96, 96, 16) for c in centred)
    hits = sum(bool(c["label"].any()) for c in centred)
    assert 5 <= hits <= 15
    assert sum(bool(random_crop(labeled.data[0])["label"].any()) for _ in range(20)) <= 1


def test_tiny_four_class_training_and_test_evaluation(fake_acdc, tmp_path):
    """train.yaml + acdc.yaml + acdc_cpu.yaml on the generated folder (tiny networks and patches): training
    validates on val.list, evaluate.yaml scores test.list per class and the mean over the three structures."""
    overrides = tiny_overrides(fake_acdc, tmp_path, num_labeled=2, run_name="acdc_tiny")
    train = ConfigWorkflow(config_file=ACDC_CONFIGS, logging_file=False, workflow_type=None, **overrides)
    train.initialize()
    train.run()
    assert (tmp_path / "models" / "model.pt").is_file()
    evaluate = ConfigWorkflow(config_file=ACDC_CONFIGS + [str(CONFIGS / "evaluate.yaml")], logging_file=False,
                              workflow_type=None, run_id="evaluating", **overrides, eval_models=["ensemble"])
    evaluate.initialize()
    evaluate.run()
    eval_dir = tmp_path / "runs" / "acdc_tiny" / "eval" / "field"
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["spacings_mm"] == [[1.5, 1.5, 10.0]]
    assert summary["class_names"] == {"1": "right_ventricle", "2": "myocardium", "3": "left_ventricle"}
    for post in ("none", "lcc"):
        assert list(summary["metrics"]["ensemble"][post]) == ["1", "2", "3", "mean"]
        assert summary["metrics"]["ensemble"][post]["mean"]["n_cases"] == 2
    assert "class_mean" in summary
    table = (eval_dir / "summary.md").read_text()
    for name in ("right_ventricle", "myocardium", "left_ventricle", "mean of 3"):
        assert f"| ensemble | none | {name} | 2 |" in table
    cases = {line.split(",")[0] for line in (eval_dir / "metrics.csv").read_text().splitlines()[1:]}
    assert cases == {"data/p5_frame01.h5", "data/p5_frame02.h5"}  # the test cases


# ---------------------------------------------------------------------------------------------- the real data


@pytest.fixture(scope="module")
def real_acdc():
    return require_acdc()


def test_real_acdc_datalist(real_acdc):
    d = acdc_datalist(real_acdc)
    assert {k: len(v) for k, v in d.items()} == {"labeled": 14, "unlabeled": 126, "validation": 20, "test": 40}
    first = (real_acdc / "train.list").read_text().split()[:14]
    assert [os.path.basename(x["image"]) for x in d["labeled"]] == [f"{i}_slice_*.h5" for i in first]
    assert all(x["image"].endswith(".h5") and not is_slice_pattern(x["image"]) for x in d["validation"] + d["test"])
    assert build_datalist(real_acdc, num_labeled=14, num_val=None) == d


def test_real_acdc_slices_stack_in_order(real_acdc):
    """A training case: every slice file, in numeric order, is one slice of the stacked volume (slice axis last)."""
    case = (real_acdc / "train.list").read_text().split()[0]
    pattern = real_acdc / "data" / f"{case}_slice_*.h5"
    files = slice_files(pattern)
    assert len(files) >= 6 and [int(f.rsplit("_", 1)[1][:-3]) for f in files] == list(range(1, len(files) + 1))
    image = np.asarray(load(str(pattern), transpose=TRANSPOSE, spacing=SPACING))
    label = np.asarray(load(str(pattern), key="label", transpose=TRANSPOSE, spacing=SPACING))
    assert image.shape[2] == len(files) and label.shape == image.shape
    for n, f in enumerate(files):
        with h5py.File(f) as h:
            assert np.array_equal(image[:, :, n], h["image"][()].T) and np.array_equal(label[:, :, n], h["label"][()].T)
    assert set(np.unique(label)) <= {0, 1, 2, 3} and 0.0 <= image.min() and image.max() <= 1.0


def test_real_acdc_preflight_of_the_labeled_and_validation_cases(real_acdc):
    d = acdc_datalist(real_acdc)
    small = {"labeled": d["labeled"][:4], "unlabeled": d["unlabeled"][:2], "validation": d["validation"][:2]}
    summary = preflight(small, num_classes=4, patch_size=(96, 96, 16), patch_divisor=16, reader=readers())
    assert summary["label_values"] == [0, 1, 2, 3]
    assert all(6 <= s <= 18 for s in (summary["min_shape"][2], summary["max_shape"][2]))


def test_fit_probe_prints_loss_and_class_counts(fake_acdc):
    """benchmarks/fit_probe.py on the generated folder: a line per reported step, the label's class counts equal
    on a fixed batch, an override reaching the config."""
    import subprocess
    import sys

    script = CONFIGS.parents[1] / "benchmarks" / "fit_probe.py"
    out = subprocess.run([sys.executable, str(script), "--dataset_dir", str(fake_acdc), "--fixed_batch", "--iterations", "4",
                          "--every", "2", "--override", "n_filters", "4", "--override", "num_labeled", "2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("net_a of train.yaml + acdc.yaml + acdc_cpu.yaml + supervised.yaml, sgd lr 0.01, one fixed batch")
    steps = [line.split(" ", 2) for line in out[1:]]
    assert [s[0] for s in steps] == ["2", "4"] and all(float(s[1]) > 0 for s in steps)
    predicted, label = (json.loads(part) for part in steps[0][2].split(" | "))
    assert len(predicted) == len(label) == 4 and sum(predicted) == sum(label) == 2 * 96 * 96 * 16
    assert steps[1][2].split(" | ")[1] == steps[0][2].split(" | ")[1]  # the same batch


def test_filter_probe_reports_kept_pseudo_labels_per_class(fake_acdc, tmp_path):
    """benchmarks/filter_probe.py on the generated folder with untrained acdc_cpu networks: per scope and class, the
    pseudo-label shares sum to 1, and ranked per class every class present keeps at least keep_ratio of them."""
    import subprocess
    import sys

    config = ConfigParser()
    config.read_config(ACDC_CONFIGS)
    torch.manual_seed(0)
    torch.save(config.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    script = CONFIGS.parents[1] / "benchmarks" / "filter_probe.py"
    out = subprocess.run([sys.executable, str(script), "--dataset_dir", str(fake_acdc), "--ckpt", str(tmp_path / "model.pt"),
                          "--batches", "1", "--override", "num_labeled", "2"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "{'keep_ratio': 0.8, 'filter_rule': 'certain', 'entropy_filter': True}" in out[0]
    rows = [line.split(" | ") for line in out[2:]]
    assert [(r[0], r[1][:9]) for r in rows] == [(s, c) for s in ("batch", "class") for c in ("0", "1", "2", "3", "KL weight")]
    for scope in ("batch", "class"):
        share = [float(r[2]) for r in rows if r[0] == scope and len(r) == 5]
        assert sum(share) == pytest.approx(1.0, abs=1e-3)
    assert all(float(r[3]) >= 0.8 for r in rows if r[0] == "class" and len(r) == 5 and float(r[2]) > 0)
    out = subprocess.run([sys.executable, str(script), "--dataset_dir", str(fake_acdc), "--ckpt", str(tmp_path / "model.pt"),
                          "--batches", "1", "--override", "num_labeled", "2", "--override", "temperature", "2.0"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[6] == "batch | KL weighting: not reported (the config's KL setting is not the paper's: {'temperature': 2.0, " \
        "'kl_weighting': True, 'detach_weight': False, 'kl_rectify': True})"


def test_filter_probe_kl_terms_by_hand():
    """One voxel kept of two: w = exp(-KL(t || s)), the factor 1 - (N / |K|) w CE on it, D of the dropped one."""
    import math
    import sys

    sys.path.insert(0, str(CONFIGS.parents[1] / "benchmarks"))
    from filter_probe import kl_terms

    t, s = [[0.8, 0.2], [0.4, 0.6]], [[0.6, 0.4], [0.5, 0.5]]  # voxels as rows
    logit = lambda p: torch.tensor(p).log().t()[None]  # noqa: E731
    w, factor, d_dropped, d = kl_terms(logit(s), logit(t), torch.tensor([[[True, False]]]))
    kl = [sum(a * math.log(a / b) for a, b in zip(p, q)) for p, q in zip(t, s)]
    assert w.tolist() == pytest.approx([math.exp(-kl[0])], rel=1e-5)
    assert factor.tolist() == pytest.approx([1 - 2 * math.exp(-kl[0]) * -math.log(0.6)], rel=1e-5)
    assert d_dropped.tolist() == pytest.approx([kl[1]], rel=1e-5) and d.tolist() == pytest.approx(kl, rel=1e-5)


def test_acdc_study_tests_each_pair_per_structure():
    """benchmarks/acdc_cpu.py's paired tests: every pair of PAIRS whose runs exist, per checkpoint and structure,
    with the mean gain over the test cases (values chosen so that each gain is known)."""
    import sys

    sys.path.insert(0, str(CONFIGS.parents[1] / "benchmarks"))
    import acdc_cpu

    def record(config, offset):
        dice = {f"case{i}": {"1": 0.1 * i + offset, "2": 0.5, "3": 0.05 * i, "mean": 0.0} for i in range(8)}
        for d in dice.values():
            d["mean"] = (d["1"] + d["2"] + d["3"]) / 3
        return {"config": config, "labels_percent": 10, "seed": 1337,
                "evaluation": {w: {"per_case_dice": dice} for w in ("final", "best")}}

    tests = acdc_cpu.paired_tests([record("supervised", 0.0), record("full", 0.03), record("full_class", 0.09)])
    pairs = {(t["reference"], t["other"]) for t in tests}
    assert pairs == set(acdc_cpu.PAIRS)
    gain = {(t["reference"], t["other"], t["checkpoint"], t["structure"]): t["mean_gain_dice_points"] for t in tests}
    assert gain[("full", "supervised", "best", "RV")] == pytest.approx(3.0)
    assert gain[("full_class", "full", "final", "RV")] == pytest.approx(6.0)
    assert gain[("full_class", "supervised", "final", "mean")] == pytest.approx(3.0)
    assert gain[("full", "supervised", "final", "Myo")] == 0.0
    assert len(tests) == 3 * 2 * 4
    assert acdc_cpu.paired_tests([record("supervised", 0.0), record("full", 0.03)]) == [
        t for t in tests if (t["reference"], t["other"]) == ("full", "supervised")]
