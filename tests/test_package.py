"""The package as shipped: no logs or run output in git, nothing written into the package folder by a test
run, and a wheel (``pip install .``, not editable) that runs inference with a bundle folder."""

import importlib.util
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO

PACKAGE = REPO / "bundle" / "scripts"
#: folders of the bundle that no run writes into (runs go to bundle/runs, data to bundle/data, ...)
WATCHED = [PACKAGE] + [REPO / "bundle" / d for d in ("configs", "models", "docs")]


def _files() -> list[str]:
    """Every file of the watched folders (the package and the bundle's configs, models, docs), bytecode aside."""
    return sorted(str(p.relative_to(REPO)) for folder in WATCHED for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


BEFORE = _files()  # when pytest collects the tests, before any of them runs


def test_git_holds_no_logs_or_run_output():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    run_output = [f for f in tracked if f.endswith((".log", ".pyc", ".db")) or "events.out.tfevents" in f
                  or {"logs", "runs", "mlruns", "eval", "__pycache__"} & set(Path(f).parts)]
    assert not run_output, f"logs or run output committed: {run_output}"
    assert not [f for f in tracked if f.startswith("bundle/scripts/") and not f.endswith(".py")]


def test_the_package_exports_the_public_names_of_its_modules():
    """``__init__.py`` imports every name of every module's ``__all__`` (``labelapp``, which needs monailabel,
    aside), so configs reach each as ``monai_dualssl.<name>``; a name added to a module needs its line there."""
    import monai_dualssl

    for info in pkgutil.iter_modules(monai_dualssl.__path__):
        if info.name == "labelapp":
            continue
        module = importlib.import_module(f"monai_dualssl.{info.name}")
        missing = [n for n in module.__all__ if getattr(monai_dualssl, n, None) is not getattr(module, n)]
        assert not missing, f"monai_dualssl/__init__.py does not import {missing} from {info.name}.py"


@pytest.mark.last
def test_the_test_run_left_the_package_folder_unchanged():
    """Runs after every other test (conftest): no test, app or bundle run wrote into the package or the bundle's
    configs, models and docs."""
    assert _files() == BEFORE


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this environment's packages (the project's dependencies) but not
    this environment's install of monai_dualssl (a .pth line adds a folder without running its .pth files)."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "project_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    return python


def test_wheel_installs_the_package_and_infers_with_a_bundle_folder(tmp_path):
    # build from a copy of the sources a fresh clone has, so nothing is written into the repository
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "bundle" / "scripts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # with this environment's setuptools when it has one (offline), else pip's isolated build environment
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("monai_dualssl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package = sorted(n for n in names if not n.startswith("monai_dualssl-"))
    assert package == sorted(f"monai_dualssl/{p.name}" for p in PACKAGE.glob("*.py"))  # the Python package only

    python = _fresh_venv(tmp_path / "venv")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "work"  # outside the repository: nothing finds bundle/ by the working directory
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import monai_dualssl; print(monai_dualssl.__file__)"],
                           capture_output=True, text=True, cwd=work)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv")

    # the bundle: a folder holding configs/ and models/ (here the repository's, copied)
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    os.symlink(REPO / "bundle" / "models" / "model.pt", bundle / "models" / "model.pt")
    image = np.zeros((48, 40, 24), np.float32)
    image[14:34, 12:30, 6:18] = 2.0
    nib.save(nib.Nifti1Image(image + np.random.default_rng(0).normal(0, 0.3, image.shape).astype(np.float32),
                             np.diag([0.9, 1.1, 2.0, 1.0])), work / "case.nii.gz")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    infer = [str(python), "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
             "--input", "case.nii.gz", "--output_dir", "out", "--num_workers", "0"]

    # without the bundle's place, the run says what is needed
    missing = subprocess.run(infer, capture_output=True, text=True, cwd=work, env=env)
    assert missing.returncode != 0 and "--bundle_root <bundle folder>" in missing.stderr.splitlines()[-1]
    assert not (work / "out").exists()

    done = subprocess.run(infer + ["--bundle_root", str(bundle)], capture_output=True, text=True, cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seg = nib.load(work / "out" / "case_seg.nii.gz")
    assert seg.shape == image.shape and np.allclose(seg.affine, np.diag([0.9, 1.1, 2.0, 1.0]))
    assert np.asarray(seg.dataobj).any()  # the shipped model finds the bright block
