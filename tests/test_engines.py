"""The dual trainer's parts on their own: the resumable loader stream, the random state, the loss terms,
the options handed to MONAI's Trainer, mixed precision and a one-process DistributedDataParallel run."""

import random
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.transforms import Compose, EnsureTyped, RandFlipd, RandGaussianNoised, RandomizableTransform, RandSpatialCropd
from torch.utils.data import DistributedSampler

from conftest import tiny_dualnet
from monai_dualssl import (
    CosineConsistencyLoss,
    CrossConsistencyLoss,
    DualSSLTrainer,
    LoaderStream,
    NonFiniteLossError,
    PrototypeContrastiveLoss,
    SupervisedLoss,
    loss_terms,
    random_state,
    set_random_state,
)

TERMS = ("ce_a", "dice_a", "corr_a", "ce_b", "dice_b", "corr_b", "loss_cps", "loss_proto", "loss_cos", "loss")


def volumes(n, seed, label=True, size=16):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        item = {"image": torch.randn(1, size, size, size, generator=g)}
        if label:
            item["label"] = (torch.rand(1, size, size, size, generator=g) > 0.5).long()
        items.append(item)
    return items


def trainer(labeled=None, unlabeled="default", lr=(0.01, 0.01), seed=0, **kwargs):
    """A tiny dual trainer on 16^3 volumes (batches of 2 labeled + 1 unlabeled, plain lists unless given)."""
    net = tiny_dualnet(seed=seed)
    if labeled is None:
        labeled = [{k: torch.stack([v[k] for v in volumes(2, 1)]) for k in ("image", "label")}] * 2
    if isinstance(unlabeled, str):
        unlabeled = [{"image": v["image"][None]} for v in volumes(3, 2, label=False)]
    options = dict(cps_loss=CrossConsistencyLoss(), proto_loss=PrototypeContrastiveLoss(min_samples=4),
                   cos_loss=CosineConsistencyLoss())
    options.update(kwargs)
    t = DualSSLTrainer(
        device="cpu", max_epochs=1, train_data_loader=labeled, unlabeled_data_loader=unlabeled,
        network_a=net.net_a, network_b=net.net_b,
        optimizer_a=torch.optim.SGD(net.net_a.parameters(), lr=lr[0]),
        optimizer_b=torch.optim.SGD(net.net_b.parameters(), lr=lr[1]),
        supervised_loss=SupervisedLoss(), **options,
    )
    return t, net


def conv_dtypes(net):
    """The output dtype of the first convolution of network A, per forward pass."""
    seen = []
    conv = next(m for m in net.net_a.modules() if isinstance(m, torch.nn.Conv3d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


# ---- loss terms for the logs ---------------------------------------------------------------------


def test_loss_terms_are_the_numbers_of_the_output_without_the_batch():
    image = torch.ones(1, 1, 2, 2, 2)
    output = {"image": image, "label": image.long(), "pred": image, "loss": torch.tensor(1.5), "w_cps": 0.25,
              "lr_a": 0.01, "proto_on_a": torch.tensor(1.0)}
    assert loss_terms(output) == {"loss": 1.5, "w_cps": 0.25, "lr_a": 0.01, "proto_on_a": 1.0}


# ---- the endless, resumable loader stream --------------------------------------------------------


def resumed_stream(state, loader):
    stream = LoaderStream(loader)
    stream.load_state_dict(state)
    return stream


def test_loader_stream_cycles_through_passes_and_resumes_within_one():
    stream = LoaderStream([10, 20, 30])
    assert len(stream) == 3 and iter(stream) is stream
    fresh = resumed_stream(stream.state_dict(), [10, 20, 30])  # a state saved before the first batch
    assert [next(fresh) for _ in range(2)] == [10, 20]
    assert [next(stream) for _ in range(2)] == [10, 20]
    state = stream.state_dict()
    assert (state["passes"], state["drawn"]) == (0, 2)
    assert [next(resumed_stream(state, [10, 20, 30])) for _ in range(1)] == [30]
    assert [next(stream) for _ in range(5)] == [30, 10, 20, 30, 10]
    state = stream.state_dict()
    assert (state["passes"], state["drawn"]) == (2, 1)
    again = resumed_stream(state, [10, 20, 30])
    assert (again.state_dict()["passes"], again.state_dict()["drawn"]) == (2, 1)
    assert [next(again) for _ in range(3)] == [20, 30, 10]
    assert (again.state_dict()["passes"], again.state_dict()["drawn"]) == (3, 1)


def numbers(n):
    return DataLoader(Dataset(list(range(n))), batch_size=2, shuffle=True)


def test_loader_stream_resumes_a_shuffled_pass_exactly():
    """Stopped after 5 batches of 7 numbers in batches of 2 (4 batches a pass, each pass reshuffled), a new stream
    given the state goes on with the batches the first would have given, across the next pass boundaries,
    and leaves the caller's random state as it was."""
    torch.manual_seed(0)
    stream = LoaderStream(numbers(7))
    [next(stream) for _ in range(5)]
    state = stream.state_dict()
    assert (state["passes"], state["drawn"]) == (1, 1)
    at_stop = torch.get_rng_state()
    expected = [next(stream).tolist() for _ in range(10)]

    torch.manual_seed(123)  # another process, another random state
    resumed = LoaderStream(numbers(7))
    before = torch.get_rng_state()
    resumed.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), before)
    torch.set_rng_state(at_stop)  # what the trainer restores after the streams
    assert [next(resumed).tolist() for _ in range(10)] == expected
    assert sorted(sum(expected[3:7], [])) == list(range(7))  # a whole pass: every number once


def test_loader_stream_sets_the_distributed_sampler_epoch_to_the_pass():
    dataset = Dataset(list(range(6)))

    def sampler():
        return DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3)

    stream = LoaderStream(DataLoader(dataset, batch_size=1, sampler=sampler()))
    drawn = [int(next(stream)) for _ in range(9)]
    expected = []
    for p in range(3):
        reference = sampler()
        reference.set_epoch(p)
        expected += list(reference)
    assert drawn == expected and drawn[:3] != drawn[3:6]


class NoBatches:
    """A loader of 3 items that yields no batch (as with drop_last and a larger batch size); iterating it
    more than a few times means a stream is looping over nothing."""

    dataset = [1, 2, 3]

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if self.passes > 3:
            raise RuntimeError("iterated over and over")
        return iter([])


def test_loader_stream_refuses_a_loader_without_batches():
    stream = LoaderStream(NoBatches())
    with pytest.raises(ValueError, match=r"yields no batch \(dataset of 3 items\)"):
        next(stream)


# ---- random state --------------------------------------------------------------------------------


def draws(generators):
    return [random.random(), float(np.random.standard_normal()), float(torch.rand(()))] + [
        float(g.standard_normal()) for g in generators]


def test_random_state_round_trip_through_a_checkpoint(tmp_path):
    """Python, NumPy (with its cached Gaussian), torch and each transform's generator continue exactly."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    generators = [np.random.RandomState(2), np.random.RandomState(3)]
    draws(generators)  # NumPy's Gaussians come in pairs: each generator now holds the second one
    torch.save({"random": random_state(generators)}, tmp_path / "state.pt")
    expected = [draws(generators) for _ in range(2)]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    for g in generators:
        g.seed(9)
    set_random_state(torch.load(tmp_path / "state.pt", weights_only=True)["random"], generators)
    assert [draws(generators) for _ in range(2)] == expected


def test_set_random_state_needs_as_many_transforms_as_saved():
    state = random_state([np.random.RandomState(0), np.random.RandomState(1)])
    with pytest.raises(ValueError, match="checkpoint holds 2 random transform states, found 1 transforms"):
        set_random_state(state, [np.random.RandomState(0)])


class FakeCuda:
    """Stands in for torch.cuda's generator functions: one device whose state is ``states``."""

    def __init__(self, monkeypatch, available):
        self.states, self.restored = [torch.tensor([7, 8], dtype=torch.uint8)], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.restored.append)
        self.available = available

    def get(self):
        assert self.available, "CUDA queried on a machine without it"
        return list(self.states)


def test_random_state_saves_and_restores_the_cuda_generators(monkeypatch):
    cuda = FakeCuda(monkeypatch, available=True)
    state = random_state()
    assert [s.tolist() for s in state["cuda"]] == [[7, 8]]
    set_random_state(state)
    assert [[s.tolist() for s in call] for call in cuda.restored] == [[[7, 8]]]


def test_a_gpu_random_state_resumes_on_a_cpu_without_touching_cuda(monkeypatch):
    gpu = FakeCuda(monkeypatch, available=True)
    state = random_state()
    cpu = FakeCuda(monkeypatch, available=False)
    assert random_state()["cuda"] == []
    set_random_state(state)
    assert gpu.restored == [] and cpu.restored == []


class Loop(RandomizableTransform):
    """A random transform that refers to itself (and to another random transform) among its attributes."""

    def __init__(self):
        super().__init__(prob=1.0)
        self.me, self.inner = self, RandGaussianNoised(keys="image", prob=1.0)

    def __call__(self, data):
        return self.inner(data)


def assert_state_holds_and_restores(t, generators):
    """The trainer's state holds each of ``generators`` once, and loading it restores them after a reseed."""
    saved = [g.get_state()[1].copy() for g in generators]
    state = t.state_dict()
    assert len(state["random"]["transforms"]) == len(generators)
    for g in generators:
        g.seed(0)
    t.load_state_dict(state)
    assert all(np.array_equal(g.get_state()[1], s) for g, s in zip(generators, saved))


def test_trainer_state_holds_each_random_transform_generator_once():
    """Nested (the croppers and noise inside the dictionary transforms), shared by both loaders, in a cycle:
    each generator is saved once and restored by ``load_state_dict``."""
    flip, crop, loop = RandFlipd(keys="image", prob=0.5), RandSpatialCropd(keys="image", roi_size=(16, 16, 16)), Loop()
    both, unlabeled_only = Compose([flip, crop, loop]), Compose([crop, loop])
    labeled = DataLoader(Dataset(volumes(2, 1, size=20), transform=both), batch_size=2)
    unlabeled = DataLoader(Dataset(volumes(2, 2, label=False, size=20), transform=unlabeled_only), batch_size=1)
    t, _ = trainer(labeled=labeled, unlabeled=unlabeled)
    generators = list({id(g): g for g in (both.R, unlabeled_only.R, flip.R, crop.R, crop.cropper.R, loop.R, loop.inner.R,
                                          loop.inner.rand_gaussian_noise.R)}.values())  # some are shared
    assert len(generators) >= 6
    assert_state_holds_and_restores(t, generators)


class Augmenting:
    """A loader that is not a DataLoader (no ``dataset``): it adds random noise to its batches itself."""

    def __init__(self, batches):
        self.batches, self.noise = batches, RandGaussianNoised(keys="image", prob=1.0)
        self.noise.set_random_state(4)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return (self.noise(b) for b in self.batches)


def test_trainer_state_holds_the_generators_of_a_loader_without_dataset():
    loader = Augmenting([{"image": v["image"][None]} for v in volumes(2, 2, label=False)])
    t, _ = trainer(unlabeled=loader)
    generators = list({id(g): g for g in (loader.noise.R, loader.noise.rand_gaussian_noise.R)}.values())
    assert_state_holds_and_restores(t, generators)


# ---- resume: the trainer continues exactly -------------------------------------------------------


def augmented_trainer(seed=0):
    """Shuffled loaders with random flips, crops and noise, networks with dropout."""
    transform = Compose([RandFlipd(keys=["image", "label"], prob=0.5), RandSpatialCropd(keys=["image", "label"], roi_size=(16, 16, 16)),
                         RandGaussianNoised(keys="image", prob=0.5)])
    unlabeled_transform = Compose([RandSpatialCropd(keys="image", roi_size=(16, 16, 16)), RandFlipd(keys="image", prob=0.5)])
    transform.set_random_state(5), unlabeled_transform.set_random_state(6)
    labeled = DataLoader(Dataset(volumes(3, 1, size=20), transform=transform), batch_size=2, shuffle=True)
    unlabeled = DataLoader(Dataset(volumes(3, 2, label=False, size=20), transform=unlabeled_transform), batch_size=1,
                           shuffle=True)
    net = tiny_dualnet(seed=seed, dropout=0.3)
    t = DualSSLTrainer(device="cpu", max_epochs=2, epoch_length=2, train_data_loader=labeled, unlabeled_data_loader=unlabeled,
                       network_a=net.net_a, network_b=net.net_b,
                       optimizer_a=torch.optim.SGD(net.net_a.parameters(), lr=0.01, momentum=0.9),
                       optimizer_b=torch.optim.SGD(net.net_b.parameters(), lr=0.01, momentum=0.9),
                       supervised_loss=SupervisedLoss(), cps_loss=CrossConsistencyLoss(), cos_loss=CosineConsistencyLoss())
    losses = []
    t.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append({k: float(e.state.output[k]) for k in
                                                                              ("loss", "ce_a", "loss_cps", "loss_cos")}))
    return t, net, losses


def test_a_resumed_trainer_continues_exactly_as_an_uninterrupted_one(tmp_path):
    """4 iterations in one go, or 2, a checkpoint, and 2 more in a fresh trainer whose loaders, transforms and
    global generators start elsewhere: the same losses at iterations 3 and 4 and the same weights."""
    torch.manual_seed(0)
    whole, whole_net, whole_losses = augmented_trainer()
    whole.run()

    torch.manual_seed(0)
    first, first_net, _ = augmented_trainer()
    first.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())
    first.run()
    torch.save({"trainer": first.state_dict(), "net": first_net.state_dict(), "opt_a": first.optimizer_a.state_dict(),
                "opt_b": first.optimizer_b.state_dict()}, tmp_path / "checkpoint.pt")

    torch.manual_seed(42), np.random.seed(42), random.seed(42)
    resumed, resumed_net, resumed_losses = augmented_trainer(seed=1)
    for t in (resumed.data_loader.loader.dataset.transform, resumed._unlabeled.loader.dataset.transform):
        t.set_random_state(99)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed_net.load_state_dict(checkpoint["net"])
    resumed.optimizer_a.load_state_dict(checkpoint["opt_a"]), resumed.optimizer_b.load_state_dict(checkpoint["opt_b"])
    resumed.load_state_dict(checkpoint["trainer"])
    resumed.run()
    assert resumed.state.iteration == 4 and resumed_losses == whole_losses[2:]
    different = [k for k, v in whole_net.state_dict().items() if not torch.equal(v, resumed_net.state_dict()[k])]
    assert not different, different[:5]


# ---- what an iteration reports and refuses -------------------------------------------------------


class NonFiniteAt(SupervisedLoss):
    """SupervisedLoss whose ``ce`` of network A is +inf at ``iteration`` (read from ``clock``)."""

    def __init__(self, clock, iteration):
        super().__init__()
        self.clock, self.iteration, self.calls = clock, iteration, 0

    def terms(self, z, y, other):
        terms = super().terms(z, y, other)
        self.calls += 1
        if self.clock.state.iteration == self.iteration and self.calls % 2 == 1:
            terms["ce"] = terms["ce"] + float("inf")
        return terms


def weights_after_first(t, net):
    """A dict that holds a copy of the weights once the first iteration of ``t`` is done."""
    copy = {}
    t.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: copy.update({k: p.clone() for k, p in net.named_parameters()}))
    return copy


def test_a_non_finite_loss_stops_before_the_update_naming_the_bad_terms():
    t, net = trainer(epoch_length=2)
    t.supervised_loss = NonFiniteAt(t, iteration=2)
    after_first = weights_after_first(t, net)
    with pytest.raises(NonFiniteLossError) as info:
        t.run()
    message = str(info.value)
    assert message.startswith("the loss is non-finite at iteration 2: ")
    assert message.endswith(". Training stopped before this update; no checkpoint holding non-finite weights is "
                            "written. Lower the learning rate (lr) or check the data.")
    assert "ce_a = inf, " in message and "loss = inf" in message
    assert not any(f"{k} =" in message for k in TERMS if k not in ("ce_a", "loss"))
    assert all(torch.equal(p, after_first[k]) for k, p in net.named_parameters())  # not updated


def nan_gradient_at(t, net, iteration):
    """From ``iteration`` on, network B's first convolution weight gets a NaN gradient (the loss stays finite)."""
    name, weight = next((n, p) for n, p in net.net_b.named_parameters() if p.dim() == 5)
    weight.register_hook(lambda g: g * float("nan") if t.state.iteration >= iteration else g)
    return name


def test_a_non_finite_gradient_of_a_finite_loss_stops_before_the_update_naming_the_parameter():
    t, net = trainer(epoch_length=2)
    name = nan_gradient_at(t, net, iteration=2)
    after_first = weights_after_first(t, net)
    with pytest.raises(NonFiniteLossError) as info:
        t.run()
    message = str(info.value)
    assert message.startswith(f"the gradient is non-finite at iteration 2 although the loss is finite ({float(t.state.output['loss']):.4g}): "
                              f"network B ({name}). Training stopped before this update")
    assert "network A" not in message
    assert all(torch.equal(p, after_first[k]) for k, p in net.named_parameters())  # neither network updated


def test_a_large_finite_gradient_whose_sum_overflows_is_not_called_non_finite():
    t, net = trainer()
    for p in net.parameters():
        p.grad = torch.full_like(p, 3e38)  # finite, but a sum of two of them is Inf
    t._check_finite_grads(torch.tensor(1.0))  # no error
    name, weight = next((n, p) for n, p in net.net_a.named_parameters() if p.numel() > 1)
    weight.grad.view(-1)[-1] = float("inf")
    with pytest.raises(NonFiniteLossError, match=re.escape(f"(1): network A ({name}). Training")):
        t._check_finite_grads(torch.tensor(1.0))


def test_with_the_float16_scaler_a_non_finite_gradient_skips_that_network_s_step_instead():
    t, net = trainer(epoch_length=2, amp=True, amp_kwargs={"dtype": torch.float16})
    nan_gradient_at(t, net, iteration=2)
    after_first = weights_after_first(t, net)
    t.run()
    assert t.state.iteration == 2 and t.scaler.get_scale() < 2.0 ** 16  # the scaler saw the NaN and backed off
    assert all(torch.equal(p, after_first[k]) for k, p in net.named_parameters() if k.startswith("net_b."))
    assert not all(torch.equal(p, after_first[k]) for k, p in net.named_parameters() if k.startswith("net_a."))


def test_an_iteration_needs_a_batch():
    t, _ = trainer()
    with pytest.raises(ValueError, match="^Must provide batch data for current iteration.$"):
        t._iteration(t, None)


def test_output_reports_both_learning_rates_and_holds_no_graph():
    t, _ = trainer(lr=(0.01, 0.02), epoch_length=1)
    t.run()
    out = t.state.output
    assert (out["lr_a"], out["lr_b"]) == (0.01, 0.02)
    assert all(not out[k].requires_grad for k in TERMS)
    assert out["loss"].grad_fn is None


def test_cps_diagnostics_reach_the_output_and_a_loss_without_them_works():
    t, _ = trainer(epoch_length=1)
    t.run()
    stats = t.cps_loss.stats
    assert stats and all(torch.equal(t.state.output[k], v) for k, v in stats.items())
    plain, _ = trainer(epoch_length=1, cps_loss=lambda a, b: (a - b).pow(2).mean())  # no ``stats``
    plain.run()
    assert "loss_cps" in plain.state.output


def test_terms_whose_weight_a_handler_sets_to_zero_are_skipped():
    """The weights live in ``state.loss_weights``: a handler may switch a term off for an iteration."""
    t, _ = trainer(epoch_length=2)
    t.add_event_handler(Events.ITERATION_STARTED(once=2), lambda e: e.state.loss_weights.update(cps=0.0, proto=0.0, cos=0.0))
    t.run()
    out = t.state.output
    assert not {"loss_cps", "loss_proto", "loss_cos", "proto_on_a"} & set(out)
    supervised = sum(out[f"ce_{n}"] + out[f"dice_{n}"] + t.supervised_loss.alpha * out[f"corr_{n}"] for n in "ab")
    assert float(out["loss"]) == pytest.approx(float(supervised), rel=1e-6)


@pytest.mark.parametrize("off", ["cps_loss", "proto_loss", "cos_loss"])
def test_semi_supervised_training_with_a_term_switched_off(off):
    t, net = trainer(epoch_length=1, **{off: None})
    before = {k: p.clone() for k, p in net.named_parameters()}
    t.run()
    reported = {"cps_loss": "loss_cps", "proto_loss": "loss_proto", "cos_loss": "loss_cos"}
    assert {v for k, v in reported.items() if k != off} <= set(t.state.output) and reported[off] not in t.state.output
    assert any(not torch.equal(before[k], p) for k, p in net.named_parameters())


def test_unlabeled_batches_may_be_plain_tensors():
    t, _ = trainer(epoch_length=2, unlabeled=[v["image"][None] for v in volumes(2, 2, label=False)])
    t.run()
    assert "loss_cps" in t.state.output


def test_train_handlers_are_attached():
    class Counter:
        def __init__(self):
            self.iterations = 0

        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(self, "iterations", self.iterations + 1))

    counter = Counter()
    t, _ = trainer(epoch_length=2, train_handlers=[counter])
    t.run()
    assert counter.iterations == 2


def test_networks_see_plain_tensors_when_the_loaders_give_meta_tensors():
    """MONAI metadata would follow every operation of the networks and losses (a quarter of a CPU step)."""
    to_meta = EnsureTyped(keys=["image", "label"], track_meta=True, allow_missing_keys=True)
    labeled = DataLoader(Dataset(volumes(2, 1), transform=to_meta), batch_size=2)
    unlabeled = DataLoader(Dataset(volumes(1, 2, label=False), transform=to_meta), batch_size=1)
    t, net = trainer(epoch_length=1, labeled=labeled, unlabeled=unlabeled)
    assert isinstance(next(iter(labeled))["image"], MetaTensor)
    seen = []
    for name in ("net_a", "net_b"):
        getattr(net, name).encoder.register_forward_pre_hook(lambda m, args: seen.append(type(args[0])))
    t.run()
    assert seen == [torch.Tensor, torch.Tensor]


# ---- how batches are moved, gradients cleared ----------------------------------------------------


class Moves(torch.Tensor):
    """A tensor that records the arguments of every ``.to`` call."""

    calls: list = []

    def to(self, *args, **kwargs):
        Moves.calls.append((args, kwargs))
        return super().to(*args, **kwargs).as_subclass(torch.Tensor)


def test_batches_are_moved_with_the_trainers_device_non_blocking_and_to_kwargs():
    """The labeled batch through ``prepare_batch`` (which may return extra items, as MONAI's
    PrepareBatchExtraInput does), the unlabeled one by ``.to`` with the same settings."""
    prepared = []

    def prepare(batchdata, device=None, non_blocking=False, **kwargs):
        prepared.append((device, non_blocking, kwargs))
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        return image, label, (), {}

    unlabeled = [{"image": v["image"][None].as_subclass(Moves)} for v in volumes(1, 2, label=False)]
    Moves.calls = []
    keep = {"memory_format": torch.preserve_format}
    t, _ = trainer(epoch_length=1, unlabeled=unlabeled, prepare_batch=prepare, non_blocking=True, to_kwargs=keep)
    t.run()
    assert prepared == [(torch.device("cpu"), True, keep)]
    assert Moves.calls == [((torch.device("cpu"),), {"non_blocking": True, **keep})]


@pytest.mark.parametrize("set_to_none", [None, True])
def test_gradients_are_cleared_before_each_forward(set_to_none):
    """As in MONAI's trainers: zeroed in place by default, dropped with ``optim_set_to_none=True``."""
    t, net = trainer(epoch_length=2, **({} if set_to_none is None else {"optim_set_to_none": True}))
    seen = []
    t.add_event_handler(IterationEvents.FORWARD_COMPLETED,
                        lambda e: seen.append([None if p.grad is None else p.grad.clone() for p in net.parameters()]))
    t.run()
    assert all(g is None for g in seen[0])  # nothing computed yet
    if set_to_none:
        assert all(g is None for g in seen[1])
    else:
        grads = [g for g in seen[1] if g is not None]
        assert len(grads) > len(seen[1]) // 2 and all(not g.any() for g in grads)


# ---- mixed precision -----------------------------------------------------------------------------


def test_default_trainer_computes_in_float32_without_a_scaler():
    t, net = trainer(epoch_length=1)
    dtypes = conv_dtypes(net)
    t.run()
    assert dtypes[0] == torch.float32 and not t.scaler.is_enabled() and t.state_dict()["scaler"] == {}


def test_bfloat16_autocast_has_no_scaler_whatever_the_default_low_precision():
    """The requested dtype is used even where autocast's default for the device is float16."""
    previous = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    try:
        # 64^3 volumes: at 16^3 (deepest level 1^3) PyTorch's CPU bfloat16 conv3d weight gradient can be non-finite
        labeled = [{k: torch.stack([v[k] for v in volumes(2, 1, size=64)]) for k in ("image", "label")}]
        unlabeled = [{"image": v["image"][None]} for v in volumes(1, 2, label=False, size=64)]
        t, net = trainer(labeled, unlabeled, epoch_length=1, amp=True, amp_kwargs={"dtype": torch.bfloat16})
        dtypes = conv_dtypes(net)
        t.run()
    finally:
        torch.set_autocast_dtype("cpu", previous)
    assert dtypes[0] == torch.bfloat16 and not t.scaler.is_enabled()
    assert all(torch.isfinite(t.state.output[k]) for k in TERMS)


@pytest.mark.parametrize("amp, amp_kwargs, default, scaler", [
    (True, {"dtype": torch.float16}, torch.bfloat16, True),
    (True, {"dtype": torch.bfloat16}, torch.bfloat16, False),
    (False, {"dtype": torch.float16}, torch.bfloat16, False),  # amp off: float32, no scaler
    (True, None, torch.float16, True),  # no dtype given: autocast's default for the device
    (True, None, torch.bfloat16, False),
])
def test_a_gradscaler_exactly_for_float16_autocast(amp, amp_kwargs, default, scaler):
    previous = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", default)
    try:
        t, _ = trainer(amp=amp, amp_kwargs=amp_kwargs)
    finally:
        torch.set_autocast_dtype("cpu", previous)
    assert t.scaler.is_enabled() == scaler


def test_float16_scaler_state_is_restored_and_a_bfloat16_checkpoint_starts_a_fresh_one():
    saved, _ = trainer(amp=True, amp_kwargs={"dtype": torch.float16})
    state = saved.state_dict()
    state["scaler"]["scale"] = 512.0  # a scale no fresh scaler has
    resumed, _ = trainer(amp=True, amp_kwargs={"dtype": torch.float16})
    fresh = resumed.scaler.state_dict()
    resumed.load_state_dict(state)
    assert resumed.scaler.state_dict() == state["scaler"]
    other, _ = trainer(amp=True, amp_kwargs={"dtype": torch.float16})
    other.load_state_dict(trainer(amp=True, amp_kwargs={"dtype": torch.bfloat16})[0].state_dict())
    assert other.scaler.state_dict() == fresh


# ---- DistributedDataParallel in one process ------------------------------------------------------


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("setting", ["proto_weight_0", "supervised", "proto"])
def test_distributed_trainer_trains_with_and_without_the_projection_head(process_group, setting):
    """The projection head is unused unless the prototype loss is on: DDP must then be told to expect unused
    parameters, and need not be otherwise."""
    kwargs = {"proto_weight_0": {"loss_weights": {"proto": 0.0}}, "supervised": {"unlabeled": None}, "proto": {}}[setting]
    t, net = trainer(epoch_length=2, distributed=True, **kwargs)
    assert isinstance(t._run_a, torch.nn.parallel.DistributedDataParallel)
    before = {k: p.clone() for k, p in net.named_parameters()}
    t.run()
    assert t.state.iteration == 2
    assert ("loss_proto" in t.state.output) == (setting == "proto")
    assert any(not torch.equal(before[k], p) for k, p in net.named_parameters() if k.startswith("net_b."))
