"""Speed and accuracy of the two evaluation protocols on real Left Atrium volumes.

Runs the field's sliding window (fixed strides, plain averaging, one window a pass) and the fast one
(50 % overlap, Gaussian blending, batched windows) with the ensemble on the same validation cases,
preprocessed as the bundle config does, and prints seconds per volume, the speed ratio, mean Dice of
each (and the difference in Dice points), the same timing on the largest volume of the dataset, and
the peak resident memory of the process. Without a checkpoint the networks keep random weights: the
timings hold, the Dice values mean nothing.

    python benchmarks/bench_inference.py --dataset_dir /data/la2018 [--ckpt bundle/models/model.pt] \
        [--config bundle/configs/train.yaml bundle/configs/la.yaml bundle/configs/la_cpu.yaml] [--num_cases 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
from pathlib import Path

import h5py
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset

from monai_dualssl.evaluation import evaluate, load_weights, protocol_inferer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DEFAULT_CONFIGS = [str(CONFIGS / name) for name in ("train.yaml", "la.yaml", "la_cpu.yaml")]


def parse_config(files: list[str], dataset_dir: str) -> ConfigParser:
    """The bundle config of ``files`` followed by evaluate.yaml, reading ``dataset_dir``."""
    parser = ConfigParser()
    parser.read_config([*files, str(CONFIGS / "evaluate.yaml")])
    parser["bundle_root"] = str(REPO / "bundle")
    parser["dataset_dir"] = dataset_dir
    return parser


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def largest_case(items: list[dict]) -> dict:
    """The item whose h5 image has the most voxels, with its label (the same h5 file holds both)."""
    def voxels(item: dict) -> int:
        with h5py.File(item["image"], "r") as f:
            shape = f["image"].shape
        return int(shape[0]) * int(shape[1]) * int(shape[2])

    item = max(items, key=voxels)
    return {"image": item["image"], "label": item.get("label", item["image"])}


def run(network, batches, parser: ConfigParser, protocol: str, out: Path) -> dict:
    """evaluate() of the ensemble with ``protocol`` on pre-loaded ``batches``; returns its summary."""
    inferer = protocol_inferer(
        protocol,
        parser.get_parsed_content("patch_size"),
        strides=parser.get_parsed_content("sw_strides"),
        overlap=parser.get_parsed_content("sw_overlap"),
        sw_batch_size=parser.get_parsed_content("sw_batch_size"),
    )
    return evaluate(network, batches, inferer, out / protocol, models=["ensemble"], device="cpu",
                    protocol=protocol, pixdim=parser.get_parsed_content("pixdim"), progress=False)


def dice(summary: dict, post: str = "none") -> float:
    return summary["metrics"]["ensemble"][post]["1"]["dice"]["mean"]


def report(title: str, field: dict, fast: dict) -> None:
    t_field, t_fast = field["seconds_per_volume"]["ensemble"], fast["seconds_per_volume"]["ensemble"]
    print(f"\n{title}")
    print(f"  field: {t_field:7.2f} s/volume  (scan interval {field['inferer']['scan_interval']}, constant blending)")
    print(f"  fast:  {t_fast:7.2f} s/volume  (scan interval {fast['inferer']['scan_interval']}, gaussian blending)")
    print(f"  speed ratio field/fast: {t_field / t_fast:.2f}x")
    for post in ("none", "lcc"):
        d_field, d_fast = dice(field, post), dice(fast, post)
        print(f"  mean Dice ({post:4s}): field {100 * d_field:6.2f}  fast {100 * d_fast:6.2f}  "
              f"fast - field {100 * (d_fast - d_field):+.2f} points")
    print(f"  peak RSS so far: {peak_rss_mib():.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=os.environ.get("LA2018_DIR"), help="LA folder with train.list")
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS, help="bundle configs, merged in order")
    parser.add_argument("--ckpt", default=None, help="model.pt (plain state_dict of network_def)")
    parser.add_argument("--num_cases", type=int, default=4, help="validation cases (of the last 16 ids); 0 skips them")
    parser.add_argument("--skip_largest", action="store_true", help="do not time the largest volume")
    args = parser.parse_args()
    if not args.dataset_dir or not (Path(args.dataset_dir) / "train.list").is_file():
        parser.error(f"--dataset_dir must be an LA folder with train.list (found {args.dataset_dir!r}; "
                     "or set LA2018_DIR).")

    config = parse_config(args.config, args.dataset_dir)
    torch.manual_seed(0)
    network = config.get_parsed_content("network_def").eval()
    if args.ckpt and Path(args.ckpt).is_file():
        load_weights(network, args.ckpt)
        print(f"weights: {args.ckpt}")
    else:
        print(f"no checkpoint ({args.ckpt or 'none given'}): random weights, for timing only; Dice is meaningless.")
    datalist = config.get_parsed_content("datalist")
    preprocessing = config.get_parsed_content("preprocessing")
    load = lambda items: list(DataLoader(Dataset(items, preprocessing), batch_size=1))  # noqa: E731
    print(f"configs: {[Path(c).name for c in args.config]}, patch {config.get_parsed_content('patch_size')}, "
          f"pixdim {config.get_parsed_content('pixdim')}, field strides {config.get_parsed_content('sw_strides')}, "
          f"{torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        if args.num_cases > 0:
            batches = load(datalist["validation"][: args.num_cases])
            shapes = [tuple(b["image"].shape[2:]) for b in batches]
            print(f"{len(batches)} validation cases, preprocessed shapes {shapes}")
            field, fast = (run(network, batches, config, p, Path(tmp)) for p in ("field", "fast"))
            report(f"validation cases ({len(batches)})", field, fast)
        if not args.skip_largest:
            items = [i for split in ("labeled", "unlabeled", "validation") for i in datalist[split]]
            big = load([largest_case(items)])
            print(f"\nlargest volume: {big[0]['image'].meta['filename_or_obj'][0]}, "
                  f"preprocessed shape {tuple(big[0]['image'].shape[2:])}")
            field, fast = (run(network, big, config, p, Path(tmp)) for p in ("field", "fast"))
            report("largest volume (timing; it may be a training case)", field, fast)
    print(f"\npeak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
