"""Cost of the loss terms relative to the two networks' forward and backward.

Times, on 2 labeled + 2 unlabeled patches, (1) the forward and backward of networks A and B with a
plain cross-entropy on the labeled half (the bare networks) and (2) the same step with every loss
term of the method (supervised + correction for both, cross consistency both ways, prototype
contrastive on the projected features of the unlabeled half, cosine), and prints the ratio (2) / (1).
The projection head the prototype loss needs (``--proj_dim``, 16 as in the configs; 0: none) is part
of (2), as it is of a training step.

    python benchmarks/bench_losses.py [--size 64 64 48] [--filters 16] [--proj_dim 16] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from monai_dualssl.losses import (
    CosineConsistencyLoss,
    CrossConsistencyLoss,
    PrototypeContrastiveLoss,
    SupervisedLoss,
)
from monai_dualssl.networks import DualNet


def bare_step(net: DualNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = y.shape[0]
    z_a, z_b = net.net_a(x), net.net_b(x)
    return F.cross_entropy(z_a[:n], y[:, 0]) + F.cross_entropy(z_b[:n], y[:, 0])


def full_step(net: DualNet, x: torch.Tensor, y: torch.Tensor, losses: dict) -> torch.Tensor:
    n = y.shape[0]
    z_a, f_a = net.net_a.forward_features(x, n)  # features of the unlabeled half, as the trainer asks
    z_b, f_b = net.net_b.forward_features(x, n)
    sup = losses["sup"]
    (l_a, u_a), (l_b, u_b) = z_a.split([n, len(z_a) - n]), z_b.split([n, len(z_b) - n])  # as the trainer
    sup_a, sup_b = sup(l_a, y, l_b), sup(l_b, y, l_a)
    total = sup_a + sup_b
    total = total + losses["cps"](u_a, u_b)
    total = total + 0.1 * losses["proto"](torch.where(sup_a > sup_b, f_a, f_b), u_a, u_b)  # the weaker
    return total + losses["cos"](z_a, z_b)


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(steps: dict, repeats: int, device: torch.device) -> dict:
    """Median time of each step, the steps alternating so that background load hits all alike."""
    times = {name: [] for name in steps}
    for i in range(repeats + 1):
        for name, step in steps.items():
            t = timed(step, device)
            if i:  # the first round warms up
                times[name].append(t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--proj_dim", type=int, default=16)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = DualNet(out_channels=args.classes, n_filters=args.filters, proj_dim=args.proj_dim).to(device).train()
    x = torch.randn(4, 1, *args.size, device=device)
    y = torch.randint(0, args.classes, (2, 1, *args.size), device=device)
    losses = {
        "sup": SupervisedLoss(),
        "cps": CrossConsistencyLoss(),
        "proto": PrototypeContrastiveLoss(),
        "cos": CosineConsistencyLoss(),
    }
    medians = interleaved(
        {"bare": lambda: bare_step(net, x, y), "full": lambda: full_step(net, x, y, losses)}, args.repeats, device
    )
    bare, full = medians["bare"], medians["full"]
    print(f"patches 2+2 x {tuple(args.size)}, n_filters {args.filters}, proj_dim {args.proj_dim}, {args.classes} classes, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}, interleaved")
    print(f"bare networks (fwd+bwd):      {bare * 1000:9.1f} ms")
    print(f"networks + all loss terms:    {full * 1000:9.1f} ms")
    print(f"ratio:                        {full / bare:9.3f}")


if __name__ == "__main__":
    main()
