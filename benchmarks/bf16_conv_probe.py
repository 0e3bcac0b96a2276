"""How often PyTorch's CPU bfloat16 conv3d weight gradient is wrong (NaN, Inf or huge), by input size and channels.

A 3x3x3 convolution (padding 1) under ``torch.autocast("cpu", dtype=torch.bfloat16)`` on inputs of 2 volumes,
its weight gradient for an upstream gradient of scale 0.01 (correct values are below 1); between trials a
freed buffer of large floats leaves the allocator's memory dirty, as a training run does. The dual trainer
stops on such a gradient (``NonFiniteLossError``); this probe tells which patch sizes reach it: the networks'
deepest level is ``patch_size / 16``.

    python benchmarks/bf16_conv_probe.py
"""

import torch

SHAPES = [(2, 2, 1), (2, 2, 2), (4, 4, 1), (4, 4, 2), (8, 8, 4), (7, 7, 5), (14, 14, 10)]
CHANNELS = (64, 16, 8)


def non_finite_rate(shape: tuple, channels: int, trials: int = 40) -> float:
    """The fraction of ``trials`` whose weight gradient has a NaN, an Inf or a value of 10 or more."""
    bad = 0
    for _ in range(trials):
        junk = torch.full((1 << 20,), 3e38)
        del junk
        x = torch.randn(2, channels, *shape)
        w = (torch.randn(channels, channels, 3, 3, 3) * 0.05).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.conv3d(x, w, None, 1, 1)
        out.backward(torch.randn_like(out) * 0.01)
        bad += not bool(w.grad.abs().max() < 10)
    return bad / trials


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}; fraction of 40 trials with a weight gradient NaN, Inf or >= 10")
    for shape in SHAPES:
        print("x".join(map(str, shape)), "  ".join(f"{c} channels: {non_finite_rate(shape, c):.2f}" for c in CHANNELS), flush=True)
