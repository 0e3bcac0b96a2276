"""First check on a new machine: a few dozen iterations of the paper's setting (``la.yaml``) with AMP.

Builds the bundle's trainer exactly as ``python -m monai.bundle run training`` does with
``train.yaml`` + ``la.yaml`` (full-width networks A and B, 2 labeled + 2 unlabeled patches of
112x112x80, SGD), on real Left Atrium data (``--dataset_dir``, the h5 folder ``la.yaml`` reads) or,
without it, on a small generated dataset, and runs ``--iterations`` iterations under mixed precision
(``--amp_dtype``: float16 with a GradScaler, bfloat16 without; ``--amp false``: float32). Every loss
term is at its full weight (no ramp-up), so each term's gradient reaches the networks. Nothing is
written into the repository (run folder, model folder and generated data live in a temporary
folder), no checkpoint is saved and validation does not run.

It fails (exit code 1) unless every loss term is finite at every iteration, both networks'
parameters changed and, with float16, the GradScaler applied at least one of the steps (a step is
skipped when the scaled gradients overflow; the scale then halves). It prints seconds per iteration
and iterations per second (excluding the first iteration, unless it is the only one), the peak memory (CUDA: the allocator's
peak, ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident memory, also before the
first iteration, i.e. with the networks and the cached data but no training step yet) and the last
iteration's loss terms.

    python benchmarks/gpu_check.py                          # CUDA: 40 iterations, float16; CPU: 3, bfloat16
    python benchmarks/gpu_check.py --dataset_dir /data/la2018 --iterations 60
    python benchmarks/gpu_check.py --amp_dtype bfloat16     # or --amp false for float32
    python benchmarks/gpu_check.py --device cpu --smoke     # tiny patches and networks: seconds
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

import monai_dualssl

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
# --smoke: the narrowest networks and smallest patches the configs accept (a few seconds on a CPU)
SMOKE = {"patch_size": [32, 32, 16], "n_filters": 4, "resnet_blocks": [1, 1, 1, 1], "vnet_stages": [1, 1, 1, 1, 1],
         "proj_dim": 8, "num_workers": 0}
SKIP = ("image", "label", "pred")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", help="Left Atrium h5 folder (train.list, <case>/mri_norm2.h5); default: generated data")
    p.add_argument("--iterations", type=int,
                   help="iterations to run (default: 40 on CUDA, 3 on CPU); the first is timed apart (warm-up)")
    p.add_argument("--amp", default="true", help="mixed precision on (true) or float32 (false)")
    p.add_argument("--amp_dtype", choices=["float16", "bfloat16"],
                   help="autocast dtype (default: float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda:0 when available)")
    p.add_argument("--smoke", action="store_true", help="tiny patches and networks, for a test")
    p.add_argument("--threads", type=int, help="CPU threads, the config's num_threads (default: OMP_NUM_THREADS, else all cores)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    args.amp = monai_dualssl.as_bool(args.amp, "--amp")
    args.amp_dtype = args.amp_dtype or ("float16" if args.device.type == "cuda" else "bfloat16")
    args.iterations = (40 if args.device.type == "cuda" else 3) if args.iterations is None else args.iterations
    if args.iterations < 1:
        p.error("--iterations must be at least 1")
    return args


def peak_rss() -> int:
    """Peak resident memory of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def overrides(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    """Config overrides for ``args`` writing under ``tmp``, and a description of the data."""
    values = {
        "bundle_root": str(tmp), "run_name": "gpu_check", "model_dir": str(tmp / "models"),
        "device": f"$torch.device('{args.device}')",
        "amp": args.amp, "amp_dtype": args.amp_dtype,
        "val_interval": 10**9,  # no validation
        **({"num_threads": args.threads} if args.threads else {}),
        **(SMOKE if args.smoke else {}),
    }
    if args.dataset_dir:
        return {**values, "dataset_dir": str(Path(args.dataset_dir).resolve())}, f"Left Atrium h5 folder {args.dataset_dir}"
    # generated: 2 labeled + 2 unlabeled cases (one batch each) and 1 validation case, larger than a patch
    patch = values.get("patch_size", [112, 112, 80])
    shape = [s + 16 for s in patch]
    data = monai_dualssl.make_synthetic_dataset(tmp / "data", num_cases=5, num_labeled=2, num_val=1, shape=shape, seed=0)
    generated = {"synthetic": False, "dataset_dir": str(data), "h5": False, "num_labeled": None, "num_val": None,
                 "datalist": "$monai_dualssl.build_datalist(@dataset_dir)"}
    return {**values, **generated}, f"generated, 5 cases of about {'x'.join(map(str, shape))}"


class Monitor:
    """Per-iteration times, loss terms, GradScaler scale and skipped steps of a trainer."""

    def __init__(self, trainer, device: torch.device, iterations: int) -> None:
        self.trainer, self.device, self.iterations = trainer, device, iterations
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # CPU seconds of this process (all its threads): wall time on a loaded machine
        self.terms: list[dict[str, float]] = []
        self.skipped = 0
        self.problems: list[str] = []
        self._scale = None
        trainer.add_event_handler(Events.ITERATION_STARTED, self.started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.completed)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def started(self, engine) -> None:
        self._sync()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()
        if engine.state.iteration == 1:  # iteration counter is already 1 here
            self.rss_before = peak_rss()
        self._scale = engine.scaler.get_scale() if engine.scaler.is_enabled() else None

    def completed(self, engine) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)
        terms = {k: v for k, v in monai_dualssl.loss_terms(engine.state.output).items() if not k.startswith(("w_", "lr_"))}
        self.terms.append(terms)
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            self.problems.append(f"iteration {engine.state.iteration}: non-finite {', '.join(bad)}")
        scaler = ""
        if self._scale is not None:
            skipped = engine.scaler.get_scale() < self._scale
            self.skipped += skipped  # the scaler found inf/NaN gradients, skipped the step and lowered the scale
            scaler = f"  [scale {self._scale:g}{', step skipped' if skipped else ''}]"
        shown = "  ".join(f"{k} {v:.4g}" for k, v in terms.items())
        print(f"iteration {engine.state.iteration}: {self.times[-1]:.2f} s (CPU {self.cpu_times[-1]:.1f} s)  {shown}{scaler}",
              flush=True)
        if engine.state.iteration >= self.iterations:
            engine.terminate()


def fingerprint(net: torch.nn.Module) -> torch.Tensor:
    """One float64 sum per parameter tensor (no copy of the weights, so the memory figure stays honest)."""
    return torch.stack([p.detach().double().sum().cpu() for p in net.parameters()])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("FAILED: --device is CUDA but torch sees no GPU")
        return 1
    precision = f"AMP {args.amp_dtype}" + (" + GradScaler" if args.amp_dtype == "float16" else "") if args.amp else "float32"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        values, data = overrides(args, Path(tmp))
        workflow = ConfigWorkflow(
            config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "la.yaml")],
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"),
            workflow_type="train",
            **values,
        )
        workflow.initialize()
        parser = workflow.parser
        trainer = parser.get_parsed_content("train#trainer")
        network = parser.get_parsed_content("network")
        patch = "x".join(map(str, parser.get_parsed_content("patch_size")))
        batch = f"{parser.get_parsed_content('batch_labeled')} + {parser.get_parsed_content('batch_unlabeled')}"
        sizes = [sum(p.numel() for p in net.parameters()) / 1e6 for net in (network.net_a, network.net_b)]
        layout = parser.get("memory_format")
        layout = f", memory format {monai_dualssl.resolve_memory_format(layout, args.device)}" if layout else ""
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        print(f"gpu_check: device {args.device} (CPU threads: {torch.get_num_threads()}, load average {load}), {precision}")
        print(f"  train.yaml + la.yaml{' (--smoke)' if args.smoke else ''}: patch {patch}, batch {batch}, "
              f"networks A {sizes[0]:.2f} M + B {sizes[1]:.2f} M parameters{layout}, loss weights {trainer.state.loss_weights}")
        print(f"  data: {data}; {args.iterations} iterations", flush=True)

        before = [fingerprint(net) for net in (network.net_a, network.net_b)]
        monitor = Monitor(trainer, args.device, args.iterations)
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        trainer.run()
        changed = [int((fingerprint(net) != old).sum()) for net, old in zip((network.net_a, network.net_b), before)]
        totals = [len(old) for old in before]
        workflow.finalize()

    problems = list(monitor.problems)
    if len(monitor.times) != args.iterations:
        problems.append(f"ran {len(monitor.times)} of {args.iterations} iterations")
    if trainer.scaler.is_enabled() and monitor.skipped >= len(monitor.times):
        problems.append(f"the GradScaler skipped every step ({monitor.skipped}): float16 gradients overflowed each time")
    for name, n in zip("AB", changed):
        if n == 0:
            problems.append(f"network {name}: no parameter changed")
    timed = slice(1, None) if len(monitor.times) > 1 else slice(None)  # one iteration: its own time, warm-up included
    seconds = sum(monitor.times[timed]) / len(monitor.times[timed])
    cpu = sum(monitor.cpu_times[timed]) / len(monitor.times[timed])
    which = "excluding the first" if len(monitor.times) > 1 else "one iteration only, warm-up included"
    print(f"\nseconds per iteration ({which}): {seconds:.3f}  ({1 / seconds:.3f} iterations/s); "
          f"first iteration {monitor.times[0]:.2f} s; CPU time per iteration {cpu:.1f} s (threads: {torch.get_num_threads()})")
    if args.device.type == "cuda":
        print(f"peak GPU memory (max_memory_allocated): {gib(torch.cuda.max_memory_allocated(args.device))}; "
              f"peak RSS {gib(peak_rss())}")
    else:
        print(f"peak RSS: {gib(peak_rss())} ({gib(monitor.rss_before)} before the first iteration)")
    if trainer.scaler.is_enabled():
        print(f"GradScaler: {monitor.skipped} of {len(monitor.times)} steps skipped, scale now {trainer.scaler.get_scale():g}")
    else:
        print("GradScaler: off (" + ("bfloat16" if args.amp else "float32") + ")")
    print(f"parameter tensors changed: A {changed[0]}/{totals[0]}, B {changed[1]}/{totals[1]}")
    print("last loss terms: " + "  ".join(f"{k} {v:.5g}" for k, v in monitor.terms[-1].items()))
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    print("OK: every loss term finite at every iteration, both networks updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
