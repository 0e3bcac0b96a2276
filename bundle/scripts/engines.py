"""The dual-network semi-supervised trainer (a :class:`monai.engines.Trainer`)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.engines import Trainer
from monai.engines.workflow import Workflow
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.transforms import Transform
from monai.utils import CommonKeys as Keys
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

__all__ = ["DualSSLTrainer", "LoaderStream", "NonFiniteLossError", "loss_terms", "random_state", "set_random_state"]

DEFAULT_WEIGHTS = {"cps": 1.0, "proto": 0.1, "cos": 1.0}
_END = object()


def loss_terms(output: dict) -> dict[str, float]:
    """``output_transform`` for StatsHandler / TensorBoardStatsHandler: every loss term, weight and lr."""
    return {k: float(v) for k, v in output.items() if k not in (Keys.IMAGE, Keys.LABEL, Keys.PRED)}


class _Forward(torch.nn.Module):
    """``x -> (logits, features)`` (features None unless asked for), one module so DDP can wrap it."""

    def __init__(self, net: torch.nn.Module, features: bool) -> None:
        super().__init__()
        self.net = net
        self.features = features

    def forward(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.net.forward_features(x, start) if self.features else (self.net(x), None)


class LoaderStream:
    """An endless, resumable stream of a loader's batches.

    Pass ``p`` is one iteration over ``loader`` (a DistributedSampler gets ``set_epoch(p)``); its
    first batch is fetched as the pass begins, so a shuffling sampler draws its order from torch's
    random state at that moment. ``state_dict()`` is the position: the pass, the batches drawn in
    it and that random state; ``load_state_dict`` begins the pass again from the same state and
    skips the batches already drawn, so the stream goes on with the batches an uninterrupted one
    would give (the random transforms' states are restored by the trainer afterwards).
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.passes, self.drawn = 0, 0
        self._iterator: Iterator | None = None
        self._first: Any = None
        self._pass_rng = torch.get_rng_state()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> LoaderStream:
        return self

    def __next__(self) -> Any:
        while True:
            if self._iterator is None:
                self._begin_pass()
            batch, self._first = (self._first, None) if self._first is not None else (next(self._iterator, _END), None)
            if batch is not _END:
                self.drawn += 1
                return batch
            self._iterator, self.passes, self.drawn = None, self.passes + 1, 0

    def _begin_pass(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.passes)
        self._pass_rng = torch.get_rng_state()
        self._iterator = iter(self.loader)
        self._first = next(self._iterator, _END)
        if self._first is _END:
            raise ValueError(f"the loader yields no batch (dataset of {len(getattr(self.loader, 'dataset', []))} items).")

    def state_dict(self) -> dict:
        return {"passes": self.passes, "drawn": self.drawn, "rng": self._pass_rng}

    def load_state_dict(self, state: Mapping) -> None:
        current = torch.get_rng_state()
        torch.set_rng_state(state["rng"])
        self.passes, self.drawn = int(state["passes"]), 0
        self._begin_pass()
        for _ in range(int(state["drawn"])):
            next(self)
        torch.set_rng_state(current)


def _random_states(objects: Iterable) -> list[np.random.RandomState]:
    """The ``RandomState`` of every MONAI transform reachable from ``objects`` (datasets or loaders), once each,
    including those held inside other transforms (e.g. the cropper of ``RandSpatialCropd``)."""
    found: dict[int, np.random.RandomState] = {}
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(getattr(obj, "R", None), np.random.RandomState):
            found.setdefault(id(obj.R), obj.R)
        for value in getattr(obj, "__dict__", {}).values():
            for child in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(child, Transform):
                    visit(child)

    for obj in objects:
        visit(getattr(obj, "dataset", obj))
    return list(found.values())


def _numpy_state(state: tuple) -> dict:
    return {"keys": torch.from_numpy(state[1].astype(np.int64)), "pos": state[2], "gauss": [state[3], state[4]]}


def _from_numpy_state(state: Mapping) -> tuple:
    return ("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], *state["gauss"])


def random_state(transforms: Sequence[np.random.RandomState] = ()) -> dict:
    """Every random generator a training step draws from: Python, NumPy, torch (CPU, CUDA) and ``transforms``."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "transforms": [_numpy_state(r.get_state()) for r in transforms],
    }


def set_random_state(state: Mapping, transforms: Sequence[np.random.RandomState] = ()) -> None:
    """Restore a :func:`random_state` (the transforms in the same order)."""
    random.setstate(state["python"])
    np.random.set_state(_from_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if len(state["transforms"]) != len(transforms):
        raise ValueError(f"checkpoint holds {len(state['transforms'])} random transform states, found {len(transforms)} transforms.")
    for generator, saved in zip(transforms, state["transforms"]):
        generator.set_state(_from_numpy_state(saved))


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` without MONAI metadata (a view, no copy). Every operation on a MetaTensor, and on each result of one,
    carries the metadata along: in the networks and losses that cost a quarter of a la_cpu training step on CPU.
    (The networks put their input in their own memory format, channels_last_3d on CPU.)"""
    return t.as_tensor() if isinstance(t, MetaTensor) else t


class NonFiniteLossError(RuntimeError):
    """The loss of an iteration, or a network's gradient of it, is NaN or Inf; the message names the iteration
    and the terms or parameters."""


class DualSSLTrainer(Trainer):
    """Trains two networks A and B together with the uncertainty-guided semi-supervised objective.

    Each iteration takes a labeled batch (which drives the epoch) and, when semi-supervised, the next
    unlabeled batch of an endlessly cycled loader. Both networks see the concatenation
    ``[x_l; x_u]`` in one forward pass; the objective is

    ``L = L_sup(z_A, y, z_B) + L_sup(z_B, y, z_A) + w_cps L_cps(z_A^u, z_B^u)
    + w_proto L_proto(f^u, z_A^u, z_B^u) + w_cos L_cos(z_A, z_B)``

    with ``f`` the features of the network whose labeled Dice loss is currently worse
    (``proto_on="weaker"``, chosen on the device) or the sum over both (``"both"``). The current weights
    live in ``engine.state.loss_weights`` (a ramp-up handler updates them). ``engine.state.output``
    holds every term, the weights and both learning rates for StatsHandler / TensorBoard; ``PRED``
    is the mean softmax of both networks on the labeled batch. A non-finite loss, or a non-finite gradient
    of a finite loss (without float16's GradScaler, which skips such steps itself), stops training with a
    :class:`NonFiniteLossError` naming the iteration and the terms or parameters, before the networks are updated.

    Both loaders are read as endless :class:`LoaderStream` objects, so ``state_dict()`` (the
    ``trainer`` entry of a checkpoint) holds, beside Ignite's counters, everything a resumed run
    needs to continue exactly as if never stopped: both streams' positions, every random generator
    (Python, NumPy, torch, CUDA, the datasets' random transforms) and the GradScaler.

    Args:
        device: device of the networks.
        max_epochs: number of epochs; an epoch is ``epoch_length`` labeled iterations.
        train_data_loader: labeled loader (dicts with ``image`` and ``label``).
        network_a, network_b: the two networks; ``forward_features(x) -> (logits, features)`` is used
            when the prototype loss is on.
        optimizer_a, optimizer_b: one optimizer per network.
        supervised_loss: a :class:`~monai_dualssl.losses.SupervisedLoss` (``terms`` is called).
        unlabeled_data_loader: unlabeled loader (dicts with ``image``); None trains supervised only and
            never touches unlabeled data.
        cps_loss: cross consistency loss on the unlabeled logits (None: off).
        proto_loss: prototype contrastive loss (None: off).
        cos_loss: cosine consistency loss on all logits (None: off).
        loss_weights: initial (maximal) weights ``{"cps", "proto", "cos"}``; missing keys take the
            defaults 1.0, 0.1, 1.0.
        proto_on: ``"weaker"`` or ``"both"``.
        input_transform_b: optional callable applied to network B's input only (an intensity
            perturbation, so voxels still correspond); None feeds both the same input.
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).
        amp: mixed precision: ``torch.autocast`` on the device type with ``amp_kwargs`` (e.g.
            ``{"dtype": torch.bfloat16}``; default float16 on CUDA, bfloat16 on CPU) and, for float16,
            a ``torch.amp.GradScaler``.
        distributed: wrap both networks in DistributedDataParallel (the process group must be
            initialised first); the loaders should carry DistributedSamplers.
        other arguments: as in :class:`monai.engines.SupervisedTrainer`.

    Raises:
        ValueError: for an unknown ``proto_on`` or unknown ``loss_weights`` keys.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network_a: torch.nn.Module,
        network_b: torch.nn.Module,
        optimizer_a: torch.optim.Optimizer,
        optimizer_b: torch.optim.Optimizer,
        supervised_loss: Callable,
        unlabeled_data_loader: Iterable | None = None,
        cps_loss: Callable | None = None,
        proto_loss: Callable | None = None,
        cos_loss: Callable | None = None,
        loss_weights: dict[str, float] | None = None,
        proto_on: str = "weaker",
        input_transform_b: Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        distributed: bool = False,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        if proto_on not in ("weaker", "both"):
            raise ValueError(f"proto_on must be 'weaker' or 'both', found {proto_on!r}.")
        unknown = set(loss_weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"loss_weights: unknown keys {sorted(unknown)}, expected a subset of {sorted(DEFAULT_WEIGHTS)}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=LoaderStream(train_data_loader),
            epoch_length=epoch_length or len(train_data_loader),
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=train_handlers,
            amp=amp,
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.network_a, self.network_b = network_a, network_b
        self.optimizer_a, self.optimizer_b = optimizer_a, optimizer_b
        self.supervised_loss = supervised_loss
        self.unlabeled_data_loader = unlabeled_data_loader
        self.cps_loss, self.proto_loss, self.cos_loss = cps_loss, proto_loss, cos_loss
        self.proto_on = proto_on
        self.input_transform_b = input_transform_b
        self.optim_set_to_none = optim_set_to_none
        self.state.loss_weights = {**DEFAULT_WEIGHTS, **(loss_weights or {})}
        self._unlabeled = None if unlabeled_data_loader is None else LoaderStream(unlabeled_data_loader)
        device_type = torch.device(device).type
        self.amp_dtype = self.amp_kwargs.get("dtype", torch.get_autocast_dtype(device_type))
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp and self.amp_dtype == torch.float16)
        features = self.semi_supervised and proto_loss is not None and self.state.loss_weights["proto"] > 0
        self._run_a, self._run_b = _Forward(network_a, features), _Forward(network_b, features)
        if distributed:
            ids = [self.state.device] if torch.device(device).type == "cuda" else None
            self._run_a, self._run_b = (
                DistributedDataParallel(m, device_ids=ids, find_unused_parameters=not features)  # unused: proj head
                for m in (self._run_a, self._run_b)
            )

    @property
    def semi_supervised(self) -> bool:
        return self.unlabeled_data_loader is not None

    def run(self) -> None:  # type: ignore[override]
        """Train from the current state (MONAI's Trainer.run without replacing the GradScaler)."""
        Workflow.run(self)

    def _streams(self) -> dict[str, LoaderStream]:
        return {"labeled": self.data_loader, **({"unlabeled": self._unlabeled} if self.semi_supervised else {})}

    def _transform_states(self) -> list[np.random.RandomState]:
        return _random_states(stream.loader for stream in self._streams().values())

    def state_dict(self) -> dict:
        """Ignite's counters plus the data streams' positions, the random generators and the GradScaler."""
        state = super().state_dict()
        state["streams"] = {name: stream.state_dict() for name, stream in self._streams().items()}
        state["random"] = random_state(self._transform_states())
        state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        for name, stream in self._streams().items():
            stream.load_state_dict(state["streams"][name])
        set_random_state(state["random"], self._transform_states())  # after the streams: skipping draws from them
        if self.scaler.is_enabled() and state.get("scaler"):  # empty from a float32/bfloat16 run: a fresh scale
            self.scaler.load_state_dict(state["scaler"])

    def _next_unlabeled(self) -> torch.Tensor:
        batch = next(self._unlabeled)
        image = batch[Keys.IMAGE] if isinstance(batch, dict) else batch
        return image.to(self.state.device, non_blocking=self.non_blocking, **self.to_kwargs)

    def _unsupervised(self, out: dict, z_a, z_b, u_a, u_b, f_a, f_b) -> torch.Tensor:
        """Weighted unlabeled terms: ``u_a``, ``u_b`` are the unlabeled samples' logits, ``f_a``, ``f_b``
        their features; ``z_a``, ``z_b`` the whole batch's logits (for the cosine term)."""
        w = self.state.loss_weights
        total = z_a.new_zeros(())
        if self.cps_loss is not None and w["cps"] > 0:
            out["loss_cps"] = self.cps_loss(u_a, u_b)
            out.update(getattr(self.cps_loss, "stats", {}))  # diagnostics (e.g. the KL weights), for the logs
            total = total + w["cps"] * out["loss_cps"]
        if f_a is not None and w["proto"] > 0:
            if self.proto_on == "weaker":
                weaker_a = out["dice_a"] > out["dice_b"]  # a device tensor: no host round-trip
                out["proto_on_a"] = weaker_a.float()
                out["loss_proto"] = self.proto_loss(torch.where(weaker_a, f_a, f_b), u_a, u_b)
            else:
                out["loss_proto"] = self.proto_loss(f_a, u_a, u_b) + self.proto_loss(f_b, u_b, u_a)
            total = total + w["proto"] * out["loss_proto"]
        if self.cos_loss is not None and w["cos"] > 0:
            out["loss_cos"] = self.cos_loss(z_a, z_b)
            total = total + w["cos"] * out["loss_cos"]
        return total

    def _compute_loss(self, x_l: torch.Tensor, y: torch.Tensor, x_u: torch.Tensor | None) -> torch.Tensor:
        out = self.state.output
        x = x_l if x_u is None else torch.cat([x_l, x_u])
        n = x_l.shape[0]
        z_a, f_a = self._run_a(x, n)
        z_b, f_b = self._run_b(x if self.input_transform_b is None else self.input_transform_b(x), n)
        # split once: one backward node per network instead of a zero-filled copy per slice
        (l_a, u_a), (l_b, u_b) = z_a.split([n, len(z_a) - n]), z_b.split([n, len(z_b) - n])
        out[Keys.PRED] = (torch.softmax(l_a.detach(), 1) + torch.softmax(l_b.detach(), 1)) / 2
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        total = z_a.new_zeros(())
        for name, z, other in (("a", l_a, l_b), ("b", l_b, l_a)):
            terms = self.supervised_loss.terms(z, y, other)
            out.update({f"{k}_{name}": v for k, v in terms.items()})
            total = total + terms["ce"] + terms["dice"] + self.supervised_loss.alpha * terms["corr"]
        if x_u is not None:
            total = total + self._unsupervised(out, z_a, z_b, u_a, u_b, f_a, f_b)
        return total

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Raise :class:`NonFiniteLossError` naming the non-finite terms when ``loss`` is NaN or Inf."""
        if bool(torch.isfinite(loss)):
            return
        terms = {k: v for k, v in self.state.output.items() if k not in (Keys.IMAGE, Keys.LABEL, Keys.PRED)}
        bad = [f"{k} = {float(v)}" for k, v in terms.items() if not bool(torch.isfinite(v).all())]
        raise NonFiniteLossError(
            f"the loss is non-finite at iteration {self.state.iteration}: {', '.join(bad)}. Training stopped before "
            "this update; no checkpoint holding non-finite weights is written. Lower the learning rate (lr) or "
            "check the data."
        )

    def _check_finite_grads(self, loss: torch.Tensor) -> None:
        """Raise :class:`NonFiniteLossError` naming, per network, the first parameter whose gradient is NaN or
        Inf. Skipped with the float16 GradScaler, which skips such steps and lowers its scale by design."""
        if self.scaler.is_enabled():
            return
        bad = []
        for name, net in (("A", self.network_a), ("B", self.network_b)):
            grads = [(n, p.grad) for n, p in net.named_parameters() if p.grad is not None]
            sums = torch.stack([g.sum() for _, g in grads]) if grads else torch.zeros(0)  # NaN and Inf propagate
            if bool(torch.isfinite(sums).all()):  # the common case: one pass (isfinite().all() per tensor is 8x slower)
                continue
            first = next((n for (n, g), t in zip(grads, sums) if not torch.isfinite(t) and not bool(torch.isfinite(g).all())), None)
            if first is not None:  # else only a sum overflowed
                bad.append(f"network {name} ({first})")
        if bad:
            raise NonFiniteLossError(
                f"the gradient is non-finite at iteration {self.state.iteration} although the loss is finite "
                f"({float(loss):.4g}): {', '.join(bad)}. Training stopped before this update; no checkpoint holding "
                "non-finite weights is written. On a CPU with amp_dtype bfloat16, PyTorch's conv3d weight gradient "
                "can be non-finite when the deepest level is 2x2 voxels in-plane (patch_size 32x32 or smaller): use "
                "a larger patch_size or amp False. Otherwise lower the learning rate (lr) or check the data."
            )

    def _iteration(self, engine: DualSSLTrainer, batchdata: dict[str, Any]) -> dict:
        """One step of both networks; fires FORWARD, LOSS, BACKWARD and MODEL_COMPLETED."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x_l, y = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        x_u = engine._next_unlabeled() if engine.semi_supervised else None
        engine.state.output = {Keys.IMAGE: x_l, Keys.LABEL: y}
        x_l, y, x_u = (_plain(t) for t in (x_l, y, x_u))
        optimizers = (engine.optimizer_a, engine.optimizer_b)
        for net, opt in zip((engine.network_a, engine.network_b), optimizers):
            net.train()
            opt.zero_grad(set_to_none=engine.optim_set_to_none)
        device_type = torch.device(engine.state.device).type
        with torch.autocast(device_type, enabled=engine.amp, **engine.amp_kwargs):
            loss = engine._compute_loss(x_l, y, x_u)
        engine.state.output[Keys.LOSS] = loss
        engine._check_finite(loss)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.scaler.scale(loss).backward()  # scale() and step() pass through when the scaler is disabled
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine._check_finite_grads(loss)
        for opt in optimizers:
            engine.scaler.step(opt)
        engine.scaler.update()
        out = engine.state.output
        for key in list(out):
            if key not in (Keys.IMAGE, Keys.LABEL, Keys.PRED):
                out[key] = out[key].detach()
        out.update({f"w_{k}": v for k, v in engine.state.loss_weights.items()})
        out.update(lr_a=optimizers[0].param_groups[0]["lr"], lr_b=optimizers[1].param_groups[0]["lr"])
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out
