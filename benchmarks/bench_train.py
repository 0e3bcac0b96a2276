"""Seconds per training iteration of the bundle's real trainer, per config and speed variant.

For each config list (``la_cpu``: train.yaml + la.yaml + la_cpu.yaml; ``la``: train.yaml + la.yaml,
the paper's full-width networks and 112x112x80 patches; ``acdc_cpu``: train.yaml + acdc.yaml + acdc_cpu.yaml,
with ``--dataset_dir`` an ACDC folder) the bundle's own objects are built from the
config (CacheDataset, loaders, both networks, optimizers, losses, the trainer and its handlers:
lr schedules, StatsHandler and TensorBoard logging, here at every iteration, an upper bound; validation
is left out, it is timed by bench_inference.py) and run for ``--iterations`` iterations per round. The variants run in the same
process, alternating round by round so that background load hits all alike (the first round warms up
and is not counted):

- ``default``: today's main (float32, ``memory_format: contiguous``);
- ``channels_last``: ``memory_format: channels_last`` (what ``auto`` picks on CPU);
- ``compile``: channels_last and ``torch.compile`` of both networks' training forward (its first round
  compiles; the compile time is printed).

Per config and variant it prints min and median wall seconds per iteration (and the median CPU seconds of
the process, less sensitive to other load on the machine), where the time goes (labeled and
unlabeled batches, forward, losses, backward, optimizer steps, handlers), the peak resident memory
during that variant's rounds, and the ratio of the iteration to the bare networks: forward + backward +
SGD step of both networks as the trainer runs them (with their projection heads on the unlabeled samples
when the prototype loss is on) under a plain cross-entropy on the same batch shapes, timed in the same
rounds; the ratio is the cost of the losses, the trainer and its handlers.
The datasets are cut to ``--cases`` labeled and unlabeled cases (loading them is not the benchmark).

    python benchmarks/bench_train.py --dataset_dir /data/la2018 [--configs la_cpu la] \
        [--variants default channels_last compile] [--iterations 3] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines.utils import IterationEvents
from monai.utils import set_determinism

import monai_dualssl

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
CONFIG_LISTS = {
    "la_cpu": ["train.yaml", "la.yaml", "la_cpu.yaml"],
    "la": ["train.yaml", "la.yaml"],
    "acdc_cpu": ["train.yaml", "acdc.yaml", "acdc_cpu.yaml"],
    "demo": ["train.yaml"],
}
VARIANTS = {
    "default": {"memory_format": "contiguous", "compile": False},
    "channels_last": {"memory_format": "channels_last", "compile": False},
    "compile": {"memory_format": "channels_last", "compile": True},
}
PHASES = ("data", "forward", "losses", "backward", "optimizer", "handlers")


def rss_mib() -> tuple[float, float]:
    """(current, peak since the last :func:`reset_peak`) resident memory in MiB, from /proc (Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def reset_peak() -> bool:
    """Reset the kernel's peak resident memory of this process (``/proc/self/clear_refs``); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _TimedStream:
    """Wraps the trainer's unlabeled stream and adds the time of every batch to ``clock['unlabeled']``."""

    def __init__(self, stream, clock: dict) -> None:
        self.stream, self.clock = stream, clock

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.stream)
        self.clock["unlabeled"] = self.clock.get("unlabeled", 0.0) + time.perf_counter() - start
        return batch


class Variant:
    """One config list and speed variant: the bundle's trainer, built from the config, with phase timers."""

    def __init__(self, name: str, files: list[str], args, shared: dict, out: Path) -> None:
        self.name, self.args = name, args
        settings = VARIANTS[name]
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        parser.update({
            "bundle_root": str(REPO / "bundle"), "dataset_dir": args.dataset_dir, "device": "$torch.device('cpu')",
            "amp": False, "output_dir": str(out / name), "memory_format": settings["memory_format"],
            "max_iterations": args.iterations, "epoch_length": args.iterations, "val_interval": 10**9,
            "log_interval": 1, "validate#dataset#cache_rate": 0.0,
        })
        if "datalist" in shared:  # the same cached datasets for every variant
            parser["train#dataset"], parser["train#unlabeled_dataset"] = shared["train"], shared["unlabeled"]
        else:
            datalist = parser.get_parsed_content("datalist")
            parser["datalist"] = {k: v[: args.cases] for k, v in datalist.items()}
        set_determinism(seed=0)
        self.trainer = parser.get_parsed_content("train#trainer")
        if "datalist" not in shared:
            shared.update(datalist=True, train=parser.get_parsed_content("train#dataset"),
                          unlabeled=parser.get_parsed_content("train#unlabeled_dataset"))
        parser.get_parsed_content("rampup").attach(self.trainer)
        self.patch = list(parser.get_parsed_content("patch_size"))
        self.batch = (parser.get_parsed_content("batch_labeled"), parser.get_parsed_content("batch_unlabeled"))
        self.classes = parser.get_parsed_content("num_classes")
        self.nets = (self.trainer.network_a, self.trainer.network_b)
        self.compile_seconds = None
        if settings["compile"]:
            self.trainer._run_a, self.trainer._run_b = (torch.compile(m) for m in (self.trainer._run_a, self.trainer._run_b))
        self.bare_nets = (self.trainer._run_a, self.trainer._run_b)  # x, start -> (logits, features or None)
        self.bare_opts = [torch.optim.SGD(n.parameters(), lr=1e-4, momentum=0.9) for n in self.nets]
        self.times: dict[str, list[float]] = {"iteration": [], "cpu": [], "bare": [], "bare_cpu": [],
                                              **{p: [] for p in PHASES}}
        self.peak = 0.0
        self.clock: dict = {}
        self.trainer._unlabeled = _TimedStream(self.trainer._unlabeled, self.clock)
        self._attach_timers()

    def _attach_timers(self) -> None:
        t, c = self.trainer, self.clock

        def mark(key):
            return lambda engine: c.__setitem__(key, time.perf_counter())

        def start(engine):
            c.clear()
            c["start"], c["cpu"] = time.perf_counter(), time.process_time()

        t.add_event_handler(Events.GET_BATCH_STARTED, start)
        t.add_event_handler(Events.GET_BATCH_COMPLETED, mark("got"))
        t.add_event_handler(Events.ITERATION_STARTED, mark("iter"))
        for event, key in ((IterationEvents.FORWARD_COMPLETED, "fwd"), (IterationEvents.LOSS_COMPLETED, "loss"),
                           (IterationEvents.BACKWARD_COMPLETED, "bwd"), (IterationEvents.MODEL_COMPLETED, "model")):
            t.add_event_handler(event, mark(key))
        t.add_event_handler(Events.ITERATION_COMPLETED, self._record)  # after the config's handlers

    def _record(self, engine) -> None:
        c, end, cpu = self.clock, time.perf_counter(), time.process_time()
        if not self.counting:
            return
        unlabeled = c.get("unlabeled", 0.0)
        self.times["iteration"].append(end - c["start"])
        self.times["cpu"].append(cpu - c["cpu"])
        self.times["data"].append(c["got"] - c["start"] + unlabeled)
        self.times["forward"].append(c["fwd"] - c["iter"] - unlabeled)
        self.times["losses"].append(c["loss"] - c["fwd"])
        self.times["backward"].append(c["bwd"] - c["loss"])
        self.times["optimizer"].append(c["model"] - c["bwd"])
        self.times["handlers"].append(end - c["model"])

    def bare_step(self) -> tuple[float, float]:
        """Wall and CPU seconds of forward + backward + SGD of both networks (their projection heads included
        when the trainer uses them, under the mean of the features) with a cross-entropy."""
        n_l, n_u = self.batch
        x = torch.randn(n_l + n_u, 1, *self.patch)
        y = torch.randint(0, self.classes, (n_l, *self.patch))
        start, cpu = time.perf_counter(), time.process_time()
        for opt in self.bare_opts:
            opt.zero_grad()
        loss = x.new_zeros(())
        for net in self.bare_nets:
            z, f = net(x, n_l)
            loss = loss + F.cross_entropy(z[:n_l], y) + (0 if f is None else f.float().mean())
        loss.backward()
        for opt in self.bare_opts:
            opt.step()
        return time.perf_counter() - start, time.process_time() - cpu

    def round(self, counting: bool) -> None:
        self.counting = counting
        reset_peak()
        start = time.perf_counter()
        self.trainer.run()  # one epoch of --iterations iterations (a finished run starts again)
        if self.compile_seconds is None and VARIANTS[self.name]["compile"]:
            self.compile_seconds = time.perf_counter() - start
        for _ in range(self.args.iterations):
            wall, cpu = self.bare_step()
            if counting:
                self.times["bare"].append(wall)
                self.times["bare_cpu"].append(cpu)
        self.peak = max(self.peak, rss_mib()[1])

    def summary(self) -> dict:
        it, bare = self.times["iteration"], self.times["bare"]
        return {
            "min": min(it), "median": statistics.median(it), "n": len(it), "cpu": statistics.median(self.times["cpu"]),
            "bare_cpu": statistics.median(self.times["bare_cpu"]),
            "bare_min": min(bare), "bare_median": statistics.median(bare),
            "ratio": statistics.median(it) / statistics.median(bare),
            "compute_ratio": statistics.median(
                [i - d - h for i, d, h in zip(it, self.times["data"], self.times["handlers"])]
            ) / statistics.median(bare),
            "phases": {p: statistics.median(self.times[p]) for p in PHASES},
            "peak_rss_mib": self.peak, "compile_s": self.compile_seconds,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=os.environ.get("LA2018_DIR"), help="LA (or ACDC) folder with train.list")
    parser.add_argument("--configs", nargs="+", default=["la_cpu"], choices=sorted(CONFIG_LISTS))
    parser.add_argument("--variants", nargs="+", default=["default", "channels_last"], choices=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=3, help="iterations per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds (after one warm-up round)")
    parser.add_argument("--cases", type=int, default=8, help="labeled / unlabeled cases kept in the datasets")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as the bundle, all cores)")
    args = parser.parse_args()
    if any(c != "demo" for c in args.configs) and not (args.dataset_dir and (Path(args.dataset_dir) / "train.list").is_file()):
        parser.error(f"--dataset_dir must be an LA folder with train.list (found {args.dataset_dir!r}; or set LA2018_DIR).")
    threads = monai_dualssl.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads, {args.iterations} iterations x {args.rounds} rounds "
          f"per variant (after a warm-up round), variants alternating; peak RSS reset per round: {reset_peak()}")
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            shared: dict = {}
            start = time.perf_counter()
            variants = [Variant(v, CONFIG_LISTS[config], args, shared, Path(tmp) / config) for v in args.variants]
            v0 = variants[0]
            print(f"\n{config} ({' + '.join(CONFIG_LISTS[config])}): patches {v0.batch[0]}+{v0.batch[1]} x {v0.patch}, "
                  f"built and cached in {time.perf_counter() - start:.0f} s")
            for r in range(args.rounds + 1):
                for v in variants:
                    v.round(counting=r > 0)
            print(f"| variant | s/iteration min | median | CPU s/iteration | bare networks min / median (CPU) "
                  f"| ratio to bare (compute only) | peak RSS MiB | compile s |")
            print("|---|---|---|---|---|---|---|---|")
            base = None
            for v in variants:
                s = v.summary()
                base = base or s["median"]
                comp = f"{s['compile_s']:.0f}" if s["compile_s"] is not None else "-"
                print(f"| {v.name} | {s['min']:.2f} | {s['median']:.2f} ({base / s['median']:.2f}x) | {s['cpu']:.2f} | "
                      f"{s['bare_min']:.2f} / {s['bare_median']:.2f} ({s['bare_cpu']:.2f}) | "
                      f"{s['ratio']:.3f} ({s['compute_ratio']:.3f}) | "
                      f"{s['peak_rss_mib']:.0f} | {comp} |")
            print("median seconds per phase:")
            for v in variants:
                phases = v.summary()["phases"]
                print(f"  {v.name:14s} " + "  ".join(f"{p} {phases[p]:.3f}" for p in PHASES))


if __name__ == "__main__":
    main()
