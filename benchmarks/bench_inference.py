"""Speed and accuracy of the two evaluation protocols on real Left Atrium volumes.

Runs the field's sliding window (fixed strides, plain averaging, one window a pass) and the fast one
(50 % overlap, Gaussian blending, batched windows) with the ensemble on the same validation cases,
preprocessed as the bundle config does, and prints seconds per volume, the speed ratio, mean Dice of
each (and the difference in Dice points), the same timing on the largest volume of the dataset, and
the peak resident memory of the process. Without a checkpoint the networks keep random weights: the
timings hold, the Dice values mean nothing.

Speed variants (``--variants``), run alternating in this process, ``--repeats`` times each (min and median
printed): ``default`` (float32, ``memory_format: contiguous``, today's main), ``channels_last`` (what the
configs' ``memory_format: auto`` picks on CPU), ``compile`` (channels_last and ``torch.compile`` of both
networks; its first run, which compiles, is timed apart) and ``jit`` (channels_last and evaluate.yaml's
``jit_optimize``: frozen TorchScript networks). Every variant predicts the same cases; the Dice
of each is printed, so a variant that changed the segmentation would show.

``--released`` also times, on the largest volume (or ``--case``), the sliding window of the field's released
code (UA-MT's ``test_single_case``, which the method's authors ship): the same windows and strides, one window
at a time, both networks in the default memory format with autograd on (the released loop has no
``no_grad``), each network's softmax averaged and accumulated in NumPy. It prints its seconds, its Dice and
the ratio of each variant's field protocol to it (the same work), fastest run to fastest run: the first run of
each in a process is slower (63 vs 38 s for 9 full-width windows in default layout, one thread), so give
``--repeats 2`` or more.

    python benchmarks/bench_inference.py --dataset_dir /data/la2018 [--ckpt bundle/models/model.pt] \
        [--config bundle/configs/train.yaml bundle/configs/la.yaml bundle/configs/la_cpu.yaml] [--num_cases 4] \
        [--variants default channels_last compile jit] [--repeats 2] [--protocols field fast] [--threads 2] [--released]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset

from monai_dualssl.evaluation import evaluate
from monai_dualssl.inference import load_weights, protocol_inferer
from monai_dualssl.networks import set_num_threads

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DEFAULT_CONFIGS = [str(CONFIGS / name) for name in ("train.yaml", "la.yaml", "la_cpu.yaml")]
# variant: (memory_format, torch.compile, jit_optimize)
VARIANTS = {"default": ("contiguous", False, False), "channels_last": ("channels_last", False, False),
            "compile": ("channels_last", True, False), "jit": ("channels_last", False, True)}


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


def run(network, batches, parser: ConfigParser, protocol: str, out: Path, jit: bool = False) -> dict:
    """evaluate() of the ensemble with ``protocol`` on pre-loaded ``batches`` (``jit``: its ``jit_optimize``); returns
    its summary."""
    inferer = protocol_inferer(
        protocol,
        parser.get_parsed_content("patch_size"),
        strides=parser.get_parsed_content("sw_strides"),
        overlap=parser.get_parsed_content("sw_overlap"),
        sw_batch_size=parser.get_parsed_content("sw_batch_size"),
    )
    return evaluate(network, batches, inferer, out / protocol, models=["ensemble"], device="cpu",
                    protocol=protocol, pixdim=parser.get_parsed_content("pixdim"), progress=False, jit_optimize=jit)


def dice(summary: dict, post: str = "none") -> float:
    return summary["metrics"]["ensemble"][post]["1"]["dice"]["mean"]


def make_variant(network, name: str):
    """A copy of ``network`` in the variant's memory format, compiled in place for ``compile``."""
    fmt, compiled, _ = VARIANTS[name]
    net = copy.deepcopy(network).set_memory_format(fmt).eval()
    if compiled:
        net.net_a.compile()
        net.net_b.compile()
    return net


def released_field(network, image: torch.Tensor, patch: list[int], strides: list[int]) -> np.ndarray:
    """Class probabilities ``[C, W, H, D]`` of the released sliding window (see the module doc) on ``image``
    ``[1, 1, W, H, D]``."""
    pads = [max(p - s, 0) for p, s in zip(patch, image.shape[2:])]
    vol = np.pad(image[0, 0].numpy(), [(q // 2, q - q // 2) for q in pads])  # centred zero padding, as released
    score = np.zeros((network.net_a.out_conv.out_channels, *vol.shape), np.float32)
    count = np.zeros(vol.shape, np.float32)
    starts = [[min(st * i, n - p) for i in range(int(np.ceil((n - p) / st)) + 1)]
              for n, p, st in zip(vol.shape, patch, strides)]
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                window = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                t = torch.from_numpy(np.ascontiguousarray(vol[window])[None, None])
                prob = (torch.softmax(network.net_a(t), 1) + torch.softmax(network.net_b(t), 1)) / 2
                score[(slice(None), *window)] += prob[0].detach().numpy()
                count[window] += 1
    w, h, d = image.shape[2:]
    return (score / count)[:, pads[0] // 2 : pads[0] // 2 + w, pads[1] // 2 : pads[1] // 2 + h, pads[2] // 2 : pads[2] // 2 + d]


def compare_released(network, batch: dict, parser: ConfigParser, repeats: int, field_fastest: dict) -> None:
    """Time :func:`released_field` ``repeats`` times on ``batch``; print its Dice and each variant's fastest field
    run as a ratio of its fastest run (``field_fastest``: seconds per variant)."""
    patch, strides = parser.get_parsed_content("patch_size"), parser.get_parsed_content("sw_strides")
    net = make_variant(network, "default")
    secs = []
    for _ in range(repeats):
        start = time.perf_counter()
        label = released_field(net, batch["image"], patch, strides).argmax(0)
        secs.append(time.perf_counter() - start)
    truth = batch["label"][0, 0].numpy() > 0
    pred = label > 0
    dice_value = 2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)
    print(f"  released loop   {min(secs):7.2f} s/volume min, {statistics.median(secs):7.2f} median; Dice {100 * dice_value:6.2f}")
    for name, seconds in field_fastest.items():
        print(f"  field / {name}: {seconds / min(secs):.2f}x the released loop's time (fastest runs)")


def compare(title: str, networks: dict, batches, parser: ConfigParser, protocols: list[str], repeats: int,
            out: Path) -> dict:
    """Every protocol with every variant, alternating, ``repeats`` timed runs each (after a warm-up run of the
    compiled variant); prints seconds per volume (min, median), the speed-up over the first variant and Dice.
    Returns the fastest seconds per volume of the field protocol per variant."""
    print(f"\n{title}")
    medians: dict = {}
    for protocol in protocols:
        results: dict = {name: [] for name in networks}
        for name, net in networks.items():
            if VARIANTS[name][1]:  # compile: the first run compiles
                start = time.perf_counter()
                run(net, batches, parser, protocol, out)
                print(f"  {protocol} / {name}: first run (compiling) {time.perf_counter() - start:.0f} s")
        for _ in range(repeats):
            for name, net in networks.items():
                results[name].append(run(net, batches, parser, protocol, out, jit=VARIANTS[name][2]))
        base = None
        for name, summaries in results.items():
            secs = [s["seconds_per_volume"]["ensemble"] for s in summaries]
            base = base or statistics.median(secs)
            medians[protocol, name] = (statistics.median(secs), dice(summaries[0]), dice(summaries[0], "lcc"), min(secs))
            print(f"  {protocol:5s} {name:14s} {min(secs):7.2f} s/volume min, {statistics.median(secs):7.2f} median "
                  f"({base / statistics.median(secs):.2f}x), scan interval {summaries[0]['inferer']['scan_interval']}; "
                  f"Dice {100 * dice(summaries[0]):6.2f} (LCC {100 * dice(summaries[0], 'lcc'):6.2f})")
    for name in networks if {"field", "fast"} <= set(protocols) else []:
        (t_field, d_field, l_field, _), (t_fast, d_fast, l_fast, _) = medians["field", name], medians["fast", name]
        print(f"  {name}: speed ratio field/fast {t_field / t_fast:.2f}x; Dice fast - field "
              f"{100 * (d_fast - d_field):+.2f} points ({100 * (l_fast - l_field):+.2f} with LCC)")
    print(f"  peak RSS so far: {peak_rss_mib():.0f} MiB")
    return {name: medians[p, name][3] for p, name in medians if p == "field"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=os.environ.get("LA2018_DIR"), help="LA folder with train.list")
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS, help="bundle configs, merged in order")
    parser.add_argument("--ckpt", default=None, help="model.pt (plain state_dict of network_def)")
    parser.add_argument("--num_cases", type=int, default=4, help="validation cases (of the last 16 ids); 0 skips them")
    parser.add_argument("--skip_largest", action="store_true", help="do not time the largest volume")
    parser.add_argument("--case", default=None, help="time this case (an id of train.list) instead of the largest")
    parser.add_argument("--variants", nargs="+", default=["default", "channels_last"], choices=list(VARIANTS))
    parser.add_argument("--protocols", nargs="+", default=["field", "fast"], choices=["field", "fast"])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant and protocol, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as the bundle, all cores)")
    parser.add_argument("--released", action="store_true", help="also time the released code's loop on the largest volume")
    args = parser.parse_args()
    if not args.dataset_dir or not (Path(args.dataset_dir) / "train.list").is_file():
        parser.error(f"--dataset_dir must be an LA folder with train.list (found {args.dataset_dir!r}; "
                     "or set LA2018_DIR).")
    if args.released and (args.skip_largest or "field" not in args.protocols):
        parser.error("--released times the field protocol on the largest volume: drop --skip_largest and keep "
                     f"'field' in --protocols (found --skip_largest {args.skip_largest}, --protocols {args.protocols}).")

    threads = set_num_threads(args.threads)
    config = parse_config(args.config, args.dataset_dir)
    torch.manual_seed(0)
    network = config.get_parsed_content("network_def").eval()
    if args.ckpt and Path(args.ckpt).is_file():
        load_weights(network, args.ckpt)
        print(f"weights: {args.ckpt}")
    else:
        print(f"no checkpoint ({args.ckpt or 'none given'}): random weights, for timing only; Dice is meaningless.")
    networks = {name: make_variant(network, name) for name in args.variants}
    datalist = config.get_parsed_content("datalist")
    preprocessing = config.get_parsed_content("preprocessing")
    load = lambda items: list(DataLoader(Dataset(items, preprocessing), batch_size=1))  # noqa: E731
    print(f"configs: {[Path(c).name for c in args.config]}, patch {config.get_parsed_content('patch_size')}, "
          f"pixdim {config.get_parsed_content('pixdim')}, field strides {config.get_parsed_content('sw_strides')}, "
          f"fast: overlap {config.get_parsed_content('sw_overlap')}, {config.get_parsed_content('sw_batch_size')} "
          f"windows a pass; {threads} threads; variants {args.variants}, {args.repeats} timed run(s) each, alternating")

    with tempfile.TemporaryDirectory() as tmp:
        if args.num_cases > 0:
            batches = load(datalist["validation"][: args.num_cases])
            shapes = [tuple(b["image"].shape[2:]) for b in batches]
            print(f"{len(batches)} validation cases, preprocessed shapes {shapes}")
            compare(f"validation cases ({len(batches)})", networks, batches, config, args.protocols, args.repeats,
                    Path(tmp))
        if not args.skip_largest:
            items = [i for split in ("labeled", "unlabeled", "validation") for i in datalist[split]]
            chosen = [i for i in items if args.case and Path(i["image"]).parent.name == args.case]
            if args.case and not chosen:
                parser.error(f"--case {args.case}: no such case in {args.dataset_dir}")
            big = load([{"image": chosen[0]["image"], "label": chosen[0].get("label", chosen[0]["image"])}]
                       if chosen else [largest_case(items)])
            print(f"\n{'case' if chosen else 'largest volume'}: {big[0]['image'].meta['filename_or_obj'][0]}, "
                  f"preprocessed shape {tuple(big[0]['image'].shape[2:])}")
            field = compare(f"{'case ' + args.case if chosen else 'largest volume'} (timing; it may be a training case)",
                            networks, big, config, args.protocols, args.repeats, Path(tmp))
            if args.released:
                compare_released(network, big[0], config, args.repeats, field)
    print(f"\npeak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
