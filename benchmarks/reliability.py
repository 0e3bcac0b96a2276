"""Bad inputs and faults, tried through the command line as a user would: prints what each one gets.

    python benchmarks/reliability.py            # about 3 minutes on 2 cores; prints a Markdown table

Every scenario runs ``python -m monai.bundle run ...`` on small generated data in a temporary folder
and reports the exit code and the last line(s) printed (where the user looks). Faults that need a
kill at a chosen moment are in the test suite (named in the table's last rows).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import torch

from monai_dualssl import make_synthetic_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
TINY = {
    "patch_size": "[32,32,16]", "n_filters": "4", "resnet_blocks": "[1,1,1,1]", "vnet_stages": "[1,1,1,1,1]",
    "proj_dim": "8", "batch_labeled": "1", "batch_unlabeled": "1", "max_iterations": "4", "epoch_length": "2",
    "val_interval": "2", "num_workers": "0", "device": "$torch.device('cpu')", "amp": "false",
}


def cli(*args: str, config: str = "train.yaml", **overrides: str) -> tuple[int, str]:
    """Exit code and the last non-empty line(s) of a bundle command (the error's first line if one is repeated)."""
    command = [sys.executable, "-m", "monai.bundle", "run", *(["training"] if config == "train.yaml" else []),
               "--config_file", str(CONFIGS / config), *args]
    for key, value in overrides.items():
        command += [f"--{key}", value]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):  # the root cause, repeated at the end
        if re.match(r"^\w+(Error|Exception): ", lines[i]):
            return result.returncode, " / ".join(lines[i : i + 3])
    return result.returncode, lines[-1] if lines else ""


def la_like(root: Path, cases: int = 6) -> Path:
    """A tiny LA-layout folder (train.list, <case>/mri_norm2.h5)."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"))
    for i in range(cases):
        label = (np.linalg.norm(grid - 16, axis=0) < rng.integers(5, 9)).astype(np.uint8)
        (root / f"case{i}").mkdir(parents=True)
        with h5py.File(root / f"case{i}" / "mri_norm2.h5", "w") as f:
            f["image"] = (label + 0.3 * rng.standard_normal(label.shape)).astype(np.float32)
            f["label"] = label
    (root / "train.list").write_text("".join(f"case{i}\n" for i in range(cases)))
    return root


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def edit_case(dataset: Path, name: str, change) -> None:
    """Rewrite one NIfTI file of ``dataset`` as ``change(array)``."""
    image = nib.load(dataset / name)
    nib.save(nib.Nifti1Image(change(np.asarray(image.dataobj)), image.affine), dataset / name)


def scenarios(work: Path):
    """Yield (bad input or fault, exit code, what the user reads)."""
    demo = work / "demo"
    make_synthetic_dataset(demo, num_cases=6, num_labeled=2, num_val=2, shape=(32, 32, 32), seed=3)
    la = la_like(work / "la")
    base = {**TINY, "synthetic": "false", "dataset_dir": str(demo)}

    def run(name: str, **extra: str) -> tuple[int, str]:
        return cli(**{**base, "bundle_root": str(work / name), **extra})

    before = listing(la)
    code, last = run("lowercase", dataset_dir=str(la), h5="true", num_labeled="2", num_val="2")
    yield "`--synthetic false` (lowercase) with an LA folder", code, f"trains on it; folder unchanged: {listing(la) == before}"
    yield "`--synthetic true` with an LA folder", *run("generator", synthetic="true", dataset_dir=str(la))
    yield "`--use_proto flase`", *run("bool", use_proto="flase")
    yield "`--max_iteration 5` (misspelt)", *run("misspelt", max_iteration="5")
    yield "`--keep_ratio abc`", *run("type", keep_ratio="abc")
    yield "`--max_iterations 5 --epoch_length 2`", *run("schedule", max_iterations="5")
    yield "`--patch_size [40,40,16]`", *run("patch", patch_size="[40,40,16]")
    run("earlier")
    yield "a fresh run into an earlier run's folder", *run("earlier")
    yield "`--resume True` with another `--lr`", *run("earlier", resume="True", lr="0.5")
    code, last = run("nothing", resume="True")
    yield "`--resume True` with nothing to resume from", code, "warning 'resume: nothing to resume from: ...', then trains"
    yield "`--lr 1e6` (diverges)", *run("nan", lr="1e6", max_iterations="20")
    nonfinite = [p for p in (work / "nan").rglob("*.pt")
                 if any(not torch.isfinite(t).all() for v in torch.load(p, weights_only=True).values()
                        if isinstance(v, dict) for t in v.values() if isinstance(t, torch.Tensor) and t.is_floating_point())]
    yield "... checkpoints left by the diverged run", 0, f"{len(nonfinite)} hold non-finite values"
    for title, name, change in (
        ("a NaN voxel in a training image", "imagesTr/case_000.nii.gz", lambda a: np.where(a == a.max(), np.nan, a).astype(np.float32)),
        ("a label value 3 with num_classes 2", "labelsTr/case_001.nii.gz", lambda a: np.where(a == 1, 3, a).astype(np.uint8)),
        ("a 4-channel training image", "imagesTr/case_000.nii.gz", lambda a: np.stack([a] * 4, -1).astype(np.float32)),
    ):
        broken = work / f"data_{name.split('/')[0]}_{len(title)}"
        shutil.copytree(demo, broken)
        edit_case(broken, name, change)
        yield title, *run(f"run_{broken.name}", dataset_dir=str(broken))
    inputs = work / "inputs"
    inputs.mkdir()
    for name in ("good", "nan"):
        array = np.random.default_rng(0).standard_normal((40, 40, 24)).astype(np.float32)
        array[3, 3, 3] = np.nan if name == "nan" else array[3, 3, 3]
        nib.save(nib.Nifti1Image(array, np.eye(4)), inputs / f"{name}.nii.gz")
    (inputs / "corrupt.nii.gz").write_bytes(b"not a volume")
    code, last = cli(config="inference.json", input=str(inputs), output_dir=str(work / "out"), num_workers="0")
    written = sorted(p.name for p in (work / "out").rglob("*.nii.gz")) if (work / "out").exists() else []
    yield "inference on a folder: good, corrupt and NaN files", code, f"writes {', '.join(written)}; then {last}"
    yield "SIGKILL during a checkpoint save", "-", "previous checkpoint kept and loadable (test_a_kill_during_a_checkpoint_save_...)"
    yield "SIGKILL after a checkpoint, then `--resume True`", "-", "weights equal to the uninterrupted run's (test_kill_and_resume)"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| bad input or fault | exit | what the user reads last |\n|---|---|---|")
        for title, code, last in scenarios(Path(tmp)):
            last = last.replace(tmp, "<tmp>").replace("|", "/")
            print(f"| {title} | {code} | {last[:240] + (' ...' if len(last) > 240 else '')} |", flush=True)


if __name__ == "__main__":
    main()
