"""The dual-network semi-supervised trainer (a :class:`monai.engines.Trainer`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import CommonKeys as Keys
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

__all__ = ["DualSSLTrainer", "loss_terms"]

DEFAULT_WEIGHTS = {"cps": 1.0, "proto": 0.1, "cos": 1.0}


def loss_terms(output: dict) -> dict[str, float]:
    """``output_transform`` for StatsHandler / TensorBoardStatsHandler: every loss term, weight and lr."""
    return {k: float(v) for k, v in output.items() if k not in (Keys.IMAGE, Keys.LABEL, Keys.PRED)}


class _Forward(torch.nn.Module):
    """``x -> (logits, features)`` (features None unless asked for), one module so DDP can wrap it."""

    def __init__(self, net: torch.nn.Module, features: bool) -> None:
        super().__init__()
        self.net = net
        self.features = features

    def forward(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.net.forward_features(x, start) if self.features else (self.net(x), None)


def _cycle(loader: Iterable) -> Iterator:
    """Endless iteration over ``loader``; a DistributedSampler gets ``set_epoch`` at every pass."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


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
    is the mean softmax of both networks on the labeled batch.

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
        amp: mixed precision (``torch.autocast`` on the device type, a GradScaler on CUDA).
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
            data_loader=train_data_loader,
            epoch_length=epoch_length,
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
        self._unlabeled: Iterator | None = None
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

    def _next_unlabeled(self) -> torch.Tensor:
        if self._unlabeled is None:
            self._unlabeled = _cycle(self.unlabeled_data_loader)
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

    def _iteration(self, engine: DualSSLTrainer, batchdata: dict[str, Any]) -> dict:
        """One step of both networks; fires FORWARD, LOSS, BACKWARD and MODEL_COMPLETED."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x_l, y = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        x_u = engine._next_unlabeled() if engine.semi_supervised else None
        engine.state.output = {Keys.IMAGE: x_l, Keys.LABEL: y}
        optimizers = (engine.optimizer_a, engine.optimizer_b)
        for net, opt in zip((engine.network_a, engine.network_b), optimizers):
            net.train()
            opt.zero_grad(set_to_none=engine.optim_set_to_none)
        device_type = torch.device(engine.state.device).type
        with torch.autocast(device_type, enabled=engine.amp, **engine.amp_kwargs):
            loss = engine._compute_loss(x_l, y, x_u)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        scaler = engine.scaler if engine.amp and device_type == "cuda" else None
        (loss if scaler is None else scaler.scale(loss)).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        for opt in optimizers:
            opt.step() if scaler is None else scaler.step(opt)
        if scaler is not None:
            scaler.update()
        out = engine.state.output
        for key in list(out):
            if key not in (Keys.IMAGE, Keys.LABEL, Keys.PRED):
                out[key] = out[key].detach()
        out.update({f"w_{k}": v for k, v in engine.state.loss_weights.items()})
        out.update(lr_a=optimizers[0].param_groups[0]["lr"], lr_b=optimizers[1].param_groups[0]["lr"])
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out
