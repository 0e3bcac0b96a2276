"""The inference side of the bundle: metadata and network checks, TorchScript export, inference.json
end to end on generated NIfTI / h5 / DICOM inputs, and the pictures."""

import importlib.util
import json
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, run, verify_metadata, verify_net_in_out
from monai.data import load_net_with_metadata
from monai.transforms import LoadImage

from conftest import TINY_NET, blob_image
from monai_dualssl import DualNet, montages_from_folder, plot_training_curves, save_montage

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch\\.jit", "ignore:Converting a tensor to a Python integer", "ignore:No hash value provided"
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
INFERENCE = CONFIGS / "inference.json"
METADATA = CONFIGS / "metadata.json"
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "monai" / "meta_schema_20240725.json"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def require(ok: bool, message: str) -> None:
    """Fail under CI, skip elsewhere, when something the test needs is missing."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def parser_of(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser.read_meta(str(METADATA))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def write_model(bundle_root: Path, **widths) -> DualNet:
    """``bundle_root/models/model.pt``: the plain state_dict of a fresh DualNet, as training writes it."""
    torch.manual_seed(0)
    net = DualNet(**widths)
    for m in net.modules():  # non-trivial running statistics, so a mismatch in eval mode would show
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    (bundle_root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), bundle_root / "models" / "model.pt")
    return net.eval()


def test_verify_metadata():
    require(SCHEMA.is_file(), f"metadata schema not found at {SCHEMA}")
    require(importlib.util.find_spec("jsonschema") is not None, "jsonschema is not installed")
    verify_metadata(meta_file=str(METADATA), filepath=str(SCHEMA))  # raises on a schema violation
    meta = json.loads(METADATA.read_text())
    assert list(meta["network_data_format"]["inputs"]) == ["image"]
    assert list(meta["network_data_format"]["outputs"]) == ["pred"]


@pytest.mark.parametrize("n", [1, 2])
def test_verify_net_in_out(n):
    verify_net_in_out(
        net_id="network_def", meta_file=str(METADATA), config_file=str(INFERENCE), device="cpu", n=n, any=1
    )


def test_config_networks():
    parser = parser_of(device="$torch.device('cpu')")
    train = ConfigParser()  # the shipped model.pt was trained with la_cpu.yaml
    train.read_config([str(CONFIGS / f) for f in ("train.yaml", "la.yaml", "la_cpu.yaml")])
    for key in ("n_filters", "resnet_blocks", "vnet_stages", "proj_dim", "num_classes", "patch_size", "pixdim", "spacing"):
        assert parser[key] == train[key], key  # model.pt loads into network_def and sees what it was trained on
    assert parser["inferer"]["roi_size"] == "@patch_size"
    net = parser.get_parsed_content("uncertainty_network").eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 16, 16, 16))
    assert out.shape == (1, 4, 16, 16, 16)  # 2 class probabilities, entropy, disagreement
    assert parser.get_parsed_content("network_def") is net  # the same loaded weights, switched mode


def test_ckpt_export_matches_eager(tmp_path):
    parser = parser_of()
    widths = {k: parser[k] for k in ("n_filters", "resnet_blocks", "vnet_stages", "proj_dim")}
    eager = write_model(tmp_path, **widths)
    ts = tmp_path / "models" / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(tmp_path / "models" / "model.pt"),
        meta_file=str(METADATA),
        config_file=str(INFERENCE),
        bundle_root=str(tmp_path),
    )
    scripted, meta, extra = load_net_with_metadata(str(ts), more_extra_files=("inference.json",))
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    assert "network_def" in json.loads(extra["inference.json"])
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = eager(x)
        found = scripted(x)
    assert found.shape == (1, 2, 32, 32, 32)
    assert torch.allclose(found, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# inference.json end to end
# ----------------------------------------------------------------------------------------------

H5_SPACING = [0.5, 0.75, 1.25]


def _write_dicom_series(folder: Path, array_zyx: np.ndarray) -> None:
    import itk

    folder.mkdir()
    image = itk.image_from_array(array_zyx.astype(np.int16))
    names = [str(folder / f"IM{i:03d}.dcm") for i in range(array_zyx.shape[0])]
    writer = itk.ImageSeriesWriter[itk.Image[itk.SS, 3], itk.Image[itk.SS, 2]].New(
        Input=image, ImageIO=itk.GDCMImageIO.New(), FileNames=names
    )
    writer.Update()


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory):
    """Runs inference.json once over a folder of 2 NIfTI volumes (non-identity affines, sizes not
    divisible by 16), 1 h5 volume and 1 DICOM series, with tiny networks."""
    root = tmp_path_factory.mktemp("inference")
    inputs = root / "images"
    inputs.mkdir()
    affine_a = np.array([[1.5, 0, 0, -20.0], [0, 1.0, 0, 12.5], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
    affine_b = np.array([[-1.5, 0, 0, 40.0], [0, 0, 1.0, -7.0], [0, 2.0, 0, 5.0], [0, 0, 0, 1]])  # flipped, permuted
    nib.save(nib.Nifti1Image(blob_image((36, 30, 20), 0)[0], affine_a), inputs / "case_a.nii.gz")
    nib.save(nib.Nifti1Image(blob_image((28, 34, 18), 1)[0], affine_b), inputs / "case_b.nii.gz")
    with h5py.File(inputs / "case_c.h5", "w") as f:
        f["image"] = blob_image((32, 24, 20), 2)[0]
    _write_dicom_series(inputs / "series_d", (blob_image((10, 24, 20), 3)[0] * 100).astype(np.int16))
    labels = root / "labels"  # ground truth for the montages: a NIfTI label and the h5 file's label
    labels.mkdir()
    label_a = (blob_image((36, 30, 20), 0)[0] > 1).astype(np.uint8)
    nib.save(nib.Nifti1Image(label_a, affine_a), labels / "case_a.nii.gz")
    with h5py.File(labels / "case_c.h5", "w") as f:
        f["label"] = (blob_image((32, 24, 20), 2)[0] > 1).astype(np.uint8)
    bundle_root = root / "bundle"
    write_model(bundle_root, **TINY_NET)
    output_dir = root / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(
            config_file=str(INFERENCE),
            logging_file=False,
            bundle_root=str(bundle_root),
            input=str(inputs),
            output_dir=str(output_dir),
            spacing=H5_SPACING,
            device="$torch.device('cpu')",
            amp=False,
            num_workers=0,
            **{"inferer#roi_size": [32, 32, 16]},
            **TINY_NET,
        )
    finally:
        torch.set_num_threads(threads)
    return inputs, output_dir


def _reference(inputs: Path, name: str) -> tuple[tuple, np.ndarray]:
    """Spatial shape and affine the outputs of case ``name`` must have."""
    if name == "case_c":
        with h5py.File(inputs / "case_c.h5") as f:
            return f["image"].shape, np.diag([*H5_SPACING, 1.0])
    if name == "series_d":
        image = LoadImage(image_only=True)(str(inputs / "series_d"))
        return tuple(image.shape), np.asarray(image.affine)
    ref = nib.load(inputs / f"{name}.nii.gz")
    return ref.shape, ref.affine


@pytest.mark.parametrize("name", ["case_a", "case_b", "case_c", "series_d"])
def test_inference_outputs(inference_run, name):
    inputs, output_dir = inference_run
    shape, affine = _reference(inputs, name)
    maps = {}
    for postfix in ("seg", "entropy", "disagreement"):
        path = output_dir / f"{name}_{postfix}.nii.gz"
        assert path.is_file(), sorted(p.name for p in output_dir.iterdir())
        img = nib.load(path)
        assert img.shape == shape, (postfix, img.shape, shape)
        np.testing.assert_allclose(img.affine, affine, atol=1e-4, err_msg=f"{name}_{postfix}")
        maps[postfix] = np.asarray(img.dataobj)
    assert maps["seg"].dtype == np.uint8
    assert set(np.unique(maps["seg"]).tolist()) <= {0, 1}
    assert maps["entropy"].min() >= -1e-6 and maps["entropy"].max() <= np.log(2) + 1e-5
    assert maps["disagreement"].min() >= -1e-6 and np.isfinite(maps["disagreement"]).all()


class _AboveMean(torch.nn.Module):
    """Stands in for the ensemble in uncertainty mode: foreground where the z-scored image is positive
    (i.e. above the volume's mean intensity), zero uncertainty."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x > 0).float()
        return torch.cat([1.0 - fg, fg, torch.zeros_like(x), torch.zeros_like(x)], dim=1)


def test_inference_keeps_voxel_correspondence(inference_run, tmp_path):
    """With a known voxel-wise "network", every saved segmentation equals ``image > mean`` voxel for
    voxel: no flip, permutation or shift between the input and the output arrays."""
    inputs, _ = inference_run
    write_model(tmp_path, **TINY_NET)
    run(
        config_file=str(INFERENCE),
        logging_file=False,
        bundle_root=str(tmp_path),
        input=str(inputs),
        output_dir=str(tmp_path / "out"),
        spacing=H5_SPACING,
        device="$torch.device('cpu')",
        amp=False,
        num_workers=0,
        uncertainty_network=_AboveMean(),
        pixdim=[0, 0, 0],  # no resampling: the output grid is the input's, voxel for voxel
        **{"inferer#roi_size": [32, 32, 16]},
        **TINY_NET,
    )
    for name in ("case_a", "case_b", "case_c", "series_d"):
        if name == "case_c":
            with h5py.File(inputs / "case_c.h5") as f:
                raw = f["image"][()]
        elif name == "series_d":
            raw = LoadImage(image_only=True)(str(inputs / "series_d")).numpy()
        else:
            raw = nib.load(inputs / f"{name}.nii.gz").get_fdata(dtype=np.float32)
        seg = np.asarray(nib.load(tmp_path / "out" / f"{name}_seg.nii.gz").dataobj)
        np.testing.assert_array_equal(seg, (raw > raw.mean()).astype(np.uint8), err_msg=name)


def test_inference_writes_nothing_else(inference_run):
    _, output_dir = inference_run
    names = sorted(p.name for p in output_dir.iterdir())
    cases, maps = ("case_a", "case_b", "case_c", "series_d"), ("seg", "entropy", "disagreement")
    expected = sorted(f"{c}_{m}.nii.gz" for c in cases for m in maps)
    assert names == expected


def test_input_expansion(tmp_path):
    """Single file, folder of files, LA layout (<case>/mri_norm2.h5), DICOM folder and DICOM sub-folders."""

    def expand(path):
        parser = parser_of(input=str(path))
        return parser.get_parsed_content("input_files"), parser.get_parsed_content("data_root_dir")

    files = tmp_path / "files"
    files.mkdir()
    for name in ("b.nii.gz", "a.nrrd", "c.mha", "d.hdf5", "notes.txt", ".hidden.nii.gz"):
        (files / name).write_bytes(b"")
    assert expand(files) == ([str(files / n) for n in ("a.nrrd", "b.nii.gz", "c.mha", "d.hdf5")], str(files))
    assert expand(files / "b.nii.gz") == ([str(files / "b.nii.gz")], "")

    la = tmp_path / "la"
    for case in ("case2", "case1"):
        (la / case).mkdir(parents=True)
        (la / case / "mri_norm2.h5").write_bytes(b"")
    assert expand(la) == ([str(la / "case1" / "mri_norm2.h5"), str(la / "case2" / "mri_norm2.h5")], str(la))

    series = tmp_path / "series"  # a folder of .dcm files, or of extension-less DICOM files: one image
    series.mkdir()
    (series / "IM1.dcm").write_bytes(b"")
    assert expand(series) == ([str(series)], "")
    (series / "IM1.dcm").rename(series / "IM1")
    assert expand(series) == ([str(series)], "")

    study = tmp_path / "study"
    for s in ("s2", "s1"):
        (study / s).mkdir(parents=True)
        (study / s / "1.dcm").write_bytes(b"")
    assert expand(study) == ([str(study / "s1"), str(study / "s2")], str(study))



def test_h5_reader_leaves_other_files_to_monai(tmp_path):
    """inference.json's reader takes h5 files by suffix; anything else goes to MONAI's own readers."""
    reader = parser_of().get_parsed_content("image_reader")
    assert reader.verify_suffix("case.h5") and not reader.verify_suffix("case.nii.gz")
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "x.nii.gz")
    loaded = LoadImage(reader=reader, image_only=True)(str(tmp_path / "x.nii.gz"))
    assert np.array_equal(np.asarray(loaded), image) and np.allclose(loaded.pixdim, [2, 3, 4])


# ----------------------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------------------


def test_montages_from_inference_outputs(inference_run, tmp_path):
    inputs, output_dir = inference_run
    pngs = montages_from_folder(output_dir, inputs, label_dir=inputs.parent / "labels", out_dir=tmp_path, num_slices=3)
    cases = ("case_a", "case_b", "case_c", "series_d")
    assert sorted(Path(p).name for p in pngs) == [f"{c}_montage.png" for c in cases]
    for p in pngs:
        assert Path(p).read_bytes()[:8] == PNG_MAGIC and Path(p).stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no input image 'case_a'"):
        montages_from_folder(output_dir, tmp_path)


def test_save_montage(tmp_path):
    image = torch.randn(1, 40, 32, 24)
    probs = torch.zeros(2, 40, 32, 24)
    probs[1, 10:25, 8:20, 5:12] = 1.0
    probs[0] = 1.0 - probs[1]
    label = torch.zeros(40, 32, 24, dtype=torch.uint8)
    label[12:26, 8:22, 6:13] = 1
    out = save_montage(image, probs, tmp_path / "sub" / "m.png", label=label, uncertainty=torch.rand(40, 32, 24))
    assert Path(out).read_bytes()[:8] == PNG_MAGIC and Path(out).stat().st_size > 1000
    out = save_montage(image.numpy(), label.numpy(), tmp_path / "no_extras.png", num_slices=2)  # no label/uncertainty
    assert Path(out).stat().st_size > 1000
    with pytest.raises(ValueError, match=r"label spatial shape \(40, 32, 20\) differs from image spatial shape"):
        save_montage(image, probs, tmp_path / "bad.png", label=np.zeros((40, 32, 20)))


def test_plot_training_curves(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    log_dir = tmp_path / "run"
    terms = ("loss", "ce_a", "ce_b", "dice_a", "dice_b", "corr_a", "corr_b", "loss_cps", "loss_proto", "loss_cos")
    with SummaryWriter(log_dir=str(log_dir)) as train_writer:  # as TensorBoardStatsHandler(tag_name="train")
        for it in range(1, 41):
            for i, tag in enumerate(terms):
                train_writer.add_scalar(tag, 1.0 / (it + i) + 0.05 * np.sin(it), it)
            for tag in ("lr_a", "lr_b"):
                train_writer.add_scalar(tag, 0.01 if it <= 20 else 0.001, it)
            for tag, w in (("w_cps", 1.0), ("w_proto", 0.1), ("w_cos", 1.0)):
                train_writer.add_scalar(tag, w * min(it / 20, 1.0), it)
    with SummaryWriter(log_dir=str(log_dir)) as val_writer:  # the validator's handler, one value per epoch
        for epoch in range(1, 5):
            val_writer.add_scalar("val_mean_dice", 0.5 + 0.1 * epoch, epoch)
    out = plot_training_curves(log_dir, tmp_path / "curves.png", epoch_length=10)
    assert Path(out).read_bytes()[:8] == PNG_MAGIC and Path(out).stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
        plot_training_curves(tmp_path / "empty", tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


def test_inference_folder_with_bad_files(tmp_path):
    """A folder with a good image, a corrupt file, an image with NaN/Inf voxels, a 2-D image and a
    2-channel image: the good one is segmented, then the run fails naming every other file and why."""
    from monai_dualssl import DataError

    inputs = tmp_path / "images"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(blob_image((24, 20, 16), 0)[0], np.eye(4)), inputs / "good.nii.gz")
    (inputs / "corrupt.nii.gz").write_bytes(b"not a NIfTI file")
    with_nan = blob_image((24, 20, 16), 1)[0]
    with_nan[3, 4, 5], with_nan[0, 0, 0] = np.nan, np.inf
    nib.save(nib.Nifti1Image(with_nan, np.eye(4)), inputs / "has_nan.nii.gz")
    nib.save(nib.Nifti1Image(blob_image((24, 20), 2)[0], np.eye(4)), inputs / "flat.nii.gz")
    nib.save(nib.Nifti1Image(blob_image((24, 20, 16, 2), 3)[0], np.eye(4)), inputs / "two_channels.nii.gz")
    write_model(tmp_path, **TINY_NET)
    with pytest.raises(RuntimeError) as error:  # the config's "Failed to evaluate", from the DataError
        run(
            config_file=str(INFERENCE),
            logging_file=False,
            bundle_root=str(tmp_path),
            input=str(inputs),
            output_dir=str(tmp_path / "out"),
            device="$torch.device('cpu')",
            amp=False,
            num_workers=0,
            **{"inferer#roi_size": [32, 32, 16]},
            **TINY_NET,
        )
    cause = error.value.__cause__
    assert isinstance(cause, DataError), repr(error.value)
    lines = str(cause).splitlines()
    assert lines[0] == "4 of 5 input image(s) could not be segmented (1 segmented):"
    problems = dict(line.strip().split(": ", 1) for line in lines[1:])
    by_name = {Path(p).name: problem for p, problem in problems.items()}
    assert sorted(by_name) == ["corrupt.nii.gz", "flat.nii.gz", "has_nan.nii.gz", "two_channels.nii.gz"]
    assert by_name["corrupt.nii.gz"].startswith("cannot be read: ")
    assert by_name["has_nan.nii.gz"] == "2 non-finite intensities (NaN/Inf)"
    assert by_name["flat.nii.gz"] == "expected a 3-D volume, found spatial shape (24, 20)"
    assert by_name["two_channels.nii.gz"].startswith("2 channels after dataset_transform (shape (2, 24, 20, 16))")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["good_disagreement.nii.gz", "good_entropy.nii.gz", "good_seg.nii.gz"]
    entropy = np.asarray(nib.load(tmp_path / "out" / "good_entropy.nii.gz").dataobj)
    assert entropy.shape == (24, 20, 16) and np.isfinite(entropy).all()
