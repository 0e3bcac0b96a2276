"""Does a config's network learn its labeled data? One network trained alone, CE + Dice, a few hundred steps.

Network A (or B, ``--network net_b``) of the config's ``network_def`` is trained with SGD (lr from the config,
momentum 0.9, weight decay 1e-4, as train.yaml's optimizers) or Adam on the config's labeled training crops:
the stream of ``train#dataloader`` (crop sampling and augmentation as in training), or with ``--fixed_batch`` the
first batch of it, repeated (can the network fit two crops at all?). The loss is :class:`SupervisedLoss` without
the correction term (CE + Dice over the foreground classes). Every ``--every`` steps it prints the loss and, on
that step's batch, the voxels predicted per class (train mode) beside the label's: a network stuck at the class
prior predicts background everywhere. ``--override KEY VALUE`` (repeatable; VALUE is read as JSON when it
parses) changes the config, e.g. ``--override dropout 0.5``.

    python benchmarks/fit_probe.py --dataset_dir /data/ACDC --fixed_batch --iterations 120 --override dropout 0.5
    python benchmarks/fit_probe.py --dataset_dir /data/ACDC --iterations 300 --every 20
    python benchmarks/fit_probe.py --configs train.yaml la.yaml la_cpu.yaml --dataset_dir /data/la2018
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

import monai_dualssl

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def probe_config(args: argparse.Namespace) -> ConfigParser:
    """The config of ``args.configs`` on ``args.dataset_dir`` with ``args.override``, without caching; sets the
    threads and the seed."""
    torch.set_num_threads(args.threads)
    set_determinism(args.seed)
    config = ConfigParser()
    config.read_config([str(CONFIGS / f) for f in args.configs])
    config.update({"bundle_root": str(CONFIGS.parent), "dataset_dir": args.dataset_dir, "cache_rate": 0.0,
                   **{k: value(v) for k, v in args.override}})
    return config


def counts(labels: torch.Tensor, classes: int) -> list[int]:
    """Voxels per class of a label map."""
    return torch.bincount(labels.flatten(), minlength=classes).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["train.yaml", "acdc.yaml", "acdc_cpu.yaml", "supervised.yaml"])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--fixed_batch", action="store_true", help="repeat the first batch instead of the stream")
    parser.add_argument("--network", choices=("net_a", "net_b"), default="net_a")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="default: the config's lr (sgd), 0.001 (adam)")
    parser.add_argument("--override", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = probe_config(args)
    net = getattr(config.get_parsed_content("network_def"), args.network).train()
    classes = config.get_parsed_content("num_classes")
    loader = config.get_parsed_content("train#dataloader")
    lr = args.lr or (config.get_parsed_content("lr") if args.optimizer == "sgd" else 1e-3)
    opt = (torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4) if args.optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), lr=lr))
    loss_fn = monai_dualssl.SupervisedLoss(alpha=0.0)
    batches = itertools.repeat(next(iter(loader))) if args.fixed_batch else itertools.chain.from_iterable(itertools.repeat(loader))
    print(f"{args.network} of {' + '.join(args.configs)}, {args.optimizer} lr {lr}, "
          f"{'one fixed batch' if args.fixed_batch else 'the training stream'}; step, loss, voxels per class "
          f"predicted | in the label")
    for step, batch in zip(range(1, args.iterations + 1), batches):
        x, y = batch["image"], batch["label"].long()
        z = net(x)
        loss = loss_fn(z, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            print(step, f"{float(loss):.3f}", counts(z.detach().argmax(1), classes), "|", counts(y, classes), flush=True)


if __name__ == "__main__":
    main()
