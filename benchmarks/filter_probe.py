"""Which pseudo-labels the entropy filter keeps, per class: a trained model on its config's unlabeled crops.

Both networks of the config's ``network_def``, loaded from ``--ckpt`` and in train mode (as in training), predict
``--batches`` batches of the unlabeled training stream (``train#unlabeled_dataloader``: crops and augmentation as
in training). For each filter scope (``batch``, the paper's: one entropy ranking over the batch; ``class``: one
per pseudo-class) it prints, per class: the share of the pseudo-labels (both networks as teachers), the fraction
of them the cross-consistency filter keeps (the config's ``keep_ratio`` and ``filter_rule``), and the reliable
voxels the prototype loss would build that class's prototype from (lowest entropy of the mean prediction, both
networks agreeing). A class whose pseudo-labels are all filtered out learns nothing from the unlabeled data;
one without reliable voxels has no prototype, and with only one class left the prototype loss is exactly 0.
Then, when the config keeps the paper's KL weighting (Zheng & Yang's: temperature 1, ``w = exp(-D)`` not
detached, plus ``mean(D)``), the mean and spread of ``w`` on the kept voxels, the fraction of kept voxels where
the gradient through ``w`` outweighs the rectification term, pushing the student away from the teacher
(:func:`kl_terms`), and the share of the rectification term ``mean(D)`` that comes from the voxels the filter
drops.

    python benchmarks/filter_probe.py --dataset_dir /data/ACDC --ckpt bundle/runs/<run>/models/model.pt
    python benchmarks/filter_probe.py --configs train.yaml la.yaml la_cpu.yaml --dataset_dir /data/la2018 \\
        --ckpt bundle/models/model.pt

``--override KEY VALUE`` (repeatable, VALUE read as JSON when it parses) changes the config, as in fit_probe.py.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

import monai_dualssl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_probe import probe_config  # noqa: E402  (the config with --override, threads and seed)


def kept_per_class(teachers: list[torch.Tensor], loss: monai_dualssl.CrossConsistencyLoss, classes: int) -> tuple:
    """Pseudo-labels per class and how many of them ``loss``'s filter keeps, over the given teachers' logits."""
    labels, kept = torch.zeros(classes, dtype=torch.long), torch.zeros(classes, dtype=torch.long)
    for z in teachers:
        pseudo = z.argmax(1)
        labels += torch.bincount(pseudo.flatten(), minlength=classes)
        kept += torch.bincount(pseudo[loss.kept(z)[:, 0]], minlength=classes)
    return labels, kept


def kl_terms(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``w = exp(-D)`` and ``factor = 1 - (N / |K|) w CE`` on the kept voxels, ``D`` on the dropped ones, ``D`` on all.

    With the paper's KL setting (temperature 1, ``w`` not detached, the rectification term on), one direction's
    per-voxel loss is ``l = (N / |K|) 1[kept] w CE + D`` with ``w = exp(-D)``, so ``dl/dz = (N / |K|) w dCE/dz +
    factor dD/dz``: where ``factor < 0`` the KL term pushes the student away from the teacher.
    """
    log_t, log_s = teacher.log_softmax(1), student.log_softmax(1)
    d = (log_t.exp() * (log_t - log_s)).sum(1, keepdim=True)
    ce = -log_s.gather(1, log_t.argmax(1, keepdim=True))
    w = torch.exp(-d)
    return w[keep], (1 - keep.numel() / keep.sum() * w * ce)[keep], d[~keep], d.flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["train.yaml", "acdc.yaml", "acdc_cpu.yaml"])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--ckpt", required=True, help="the two networks' state dict (a run's models/model.pt)")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args()
    config = probe_config(args)
    nets = config.get_parsed_content("network_def")
    nets.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True))
    nets.train()
    classes = config.get_parsed_content("num_classes")
    loader = config.get_parsed_content("train#unlabeled_dataloader")
    logits = []
    with torch.no_grad():
        for batch in itertools.islice(loader, args.batches):
            x = torch.as_tensor(batch["image"])
            logits.append((nets.net_a(x), nets.net_b(x)))
    setting = config.get_parsed_content
    settings = {"keep_ratio": setting("keep_ratio"), "filter_rule": setting("filter_rule"),
                "entropy_filter": monai_dualssl.as_bool(setting("entropy_filter"), "entropy_filter")}
    kl_settings = {"temperature": setting("temperature"),
                   **{k: monai_dualssl.as_bool(setting(k), k) for k in ("kl_weighting", "detach_weight", "kl_rectify")}}
    paper_kl = kl_settings == {"temperature": 1.0, "kl_weighting": True, "detach_weight": False, "kl_rectify": True}
    print(f"{' + '.join(args.configs)}, {args.ckpt}, {len(logits)} unlabeled batches, {settings}")
    print("scope | class | share of pseudo-labels | kept by the filter | reliable voxels (prototype)")
    for scope in ("batch", "class"):
        cps = monai_dualssl.CrossConsistencyLoss(filter_scope=scope, **settings)
        proto = monai_dualssl.PrototypeContrastiveLoss(keep_ratio=settings["keep_ratio"], filter_scope=scope)
        labels, kept = kept_per_class([z for pair in logits for z in pair], cps, classes)
        reliable = torch.zeros(classes, dtype=torch.long)
        for za, zb in logits:
            pseudo, mask = proto.partition([za, zb])
            reliable += torch.bincount(pseudo[mask], minlength=classes)
        for c in range(classes):
            print(f"{scope} | {c} | {labels[c] / labels.sum():.4f} | {kept[c] / labels[c].clamp_min(1):.3f} | {int(reliable[c])}")
        if not paper_kl:
            print(f"{scope} | KL weighting: not reported (the config's KL setting is not the paper's: {kl_settings})")
            continue
        w, factor, d_dropped, d = (torch.cat(t) for t in zip(*(kl_terms(s, t, cps.kept(t)) for za, zb in logits
                                                                 for s, t in ((za, zb), (zb, za)))))
        print(f"{scope} | KL weight w = exp(-D) on the kept voxels: mean {w.mean():.4f}, std {w.std():.4f}; "
              f"kept voxels where the KL term pushes the student away from the teacher: {(factor < 0).float().mean():.4f}; "
              f"mean D {d.mean():.4f}, of which from the dropped voxels {d_dropped.sum() / d.sum():.3f}")


if __name__ == "__main__":
    main()
