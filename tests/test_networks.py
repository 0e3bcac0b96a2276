"""Shapes, parameter counts, input checks, dropout, TorchScript and the ensemble output of the networks."""

import math
import re

import pytest
import torch

from conftest import tiny_dualnet
from monai_dualssl.networks import DualNet, ResNetVNet, VNet, ensemble_uncertainty, stride_divisors

pytestmark = pytest.mark.filterwarnings("ignore:`torch\\.jit", "ignore:Converting a tensor to a Python integer")


NETS = [VNet, ResNetVNet]
SMALL = {VNet: {"stages": (1, 1, 1, 1, 1)}, ResNetVNet: {"blocks": (1, 1, 1, 1)}}


def small(cls, **kwargs):
    args = {"n_filters": 4, **SMALL[cls], **kwargs}
    return cls(**args)


def x32(channels=1, batch=1, seed=0, size=(32, 32, 32)):
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cls, expected", [(VNet, 9.45e6), (ResNetVNet, 17.9e6)])
def test_default_parameter_count(cls, expected):
    assert abs(n_params(cls()) - expected) <= 0.05 * expected


def test_dualnet_state_dict_keys():
    keys = tiny_dualnet().state_dict().keys()
    assert keys and all(k.startswith(("net_a.", "net_b.")) for k in keys)
    assert any(k.startswith("net_a.") for k in keys) and any(k.startswith("net_b.") for k in keys)


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("out_channels", [2, 3])
@pytest.mark.parametrize("proj_dim", [0, 6])
def test_output_shapes(cls, out_channels, proj_dim):
    net = small(cls, out_channels=out_channels, proj_dim=proj_dim).eval()
    x = torch.randn(1, 1, 16, 32, 48)
    with torch.no_grad():
        y = net(x)
        logits, feats = net.forward_features(x)
    assert y.shape == (1, out_channels, 16, 32, 48)
    assert logits.shape == y.shape
    assert torch.allclose(logits, y)
    assert feats.shape == (1, proj_dim if proj_dim else 4, 16, 32, 48)


@pytest.mark.parametrize("cls", NETS)
def test_two_input_channels(cls):
    net = small(cls, in_channels=2).eval()
    with torch.no_grad():
        assert net(x32(channels=2, size=(16, 16, 16))).shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize("cls", NETS)
def test_input_checks(cls):
    net = small(cls).eval()
    with pytest.raises(ValueError, match=r"spatial size \(30, 32, 32\) must be divisible by 16"):
        net(torch.randn(1, 1, 30, 32, 32))
    with pytest.raises(ValueError, match=r"DivisiblePadd"):
        net.forward_features(torch.randn(1, 1, 32, 32, 40))
    msg = r"expected input of shape \[B, 1, H, W, D\], found shape \(1, 2, 32, 32, 32\)"
    with pytest.raises(ValueError, match=msg):
        net(x32(channels=2))
    with pytest.raises(ValueError, match=cls.__name__):
        net(torch.randn(1, 32, 32, 32))


ANISOTROPIC = [[2, 2, 1], [2, 2, 1], 2, 2]  # a short slice axis kept at full resolution for two levels


@pytest.mark.parametrize("strides, divisors", [(None, [16, 16, 16]), ([2, 2, 2, 2], [16, 16, 16]),
                                               (ANISOTROPIC, [16, 16, 4]), ([1, [1, 2, 1], 2, [2, 1, 1]], [4, 4, 2])])
def test_stride_divisors(strides, divisors):
    assert stride_divisors(strides) == divisors


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_anisotropic_strides_keep_the_slice_axis_for_two_levels(cls, memory_format):
    net = small(cls, out_channels=3, proj_dim=5, strides=ANISOTROPIC, memory_format=memory_format).eval()
    x = torch.randn(2, 1, 32, 16, 8)
    with torch.no_grad():
        feats = net.encoder(x)
        logits, proj = net.forward_features(x, 1)
    # in-plane halved at every level, the slice axis only at the last two
    assert [tuple(f.shape[2:]) for f in feats] == [(32, 16, 8), (16, 8, 8), (8, 4, 8), (4, 2, 4), (2, 1, 2)]
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32, 64]
    assert logits.shape == (2, 3, 32, 16, 8) and proj.shape == (1, 5, 32, 16, 8)
    # the same parameters as the isotropic network except the strided kernels' last axis (2 -> 1)
    iso = small(cls, out_channels=3, proj_dim=5)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    iso_shapes = {k: tuple(v.shape) for k, v in iso.state_dict().items()}
    assert shapes.keys() == iso_shapes.keys()
    differ = {k for k in shapes if shapes[k] != iso_shapes[k]}
    assert differ and all(shapes[k][-1] == 1 and iso_shapes[k][-1] == 2 and shapes[k][:-1] == iso_shapes[k][:-1]
                          for k in differ)
    with pytest.raises(ValueError, match=re.escape("divisible by (16, 16, 4) along its axes")):
        net(torch.randn(1, 1, 32, 16, 6))
    net(torch.randn(1, 1, 16, 16, 4))  # 4 slices suffice


def test_anisotropic_dualnet_scripts_and_matches_eager():
    net = DualNet(n_filters=4, resnet_blocks=(1, 1, 1, 1), vnet_stages=(1, 1, 1, 1, 1), out_channels=4,
                  strides=ANISOTROPIC).eval()
    x = torch.randn(1, 1, 16, 32, 4)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(net)(x), net(x), atol=1e-6)


@pytest.mark.parametrize("strides", [[2, 2, 2], [2, 2, 2, 3], [[2, 2], 2, 2, 2], [0, 2, 2, 2], 2, [2.5, 2, 2, 2]])
def test_invalid_strides(strides):
    with pytest.raises(ValueError, match=r"strides must be 4 down-sampling steps"):
        VNet(n_filters=4, strides=strides)


def test_dualnet_input_check():
    with pytest.raises(ValueError, match="divisible by 16"):
        tiny_dualnet()(torch.randn(1, 1, 32, 24, 32))


def test_dualnet_is_mean_of_softmaxes():
    net = tiny_dualnet(out_channels=3).eval()
    x = x32(size=(16, 32, 16))
    with torch.no_grad():
        p = net(x)
        expected = (torch.softmax(net.net_a(x), 1) + torch.softmax(net.net_b(x), 1)) / 2
    assert isinstance(net.net_a, ResNetVNet) and isinstance(net.net_b, VNet)
    assert p.shape == (1, 3, 16, 32, 16)
    assert torch.allclose(p, expected, atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(1, 16, 32, 16), atol=1e-5)

    net_log = tiny_dualnet(seed=1, out_channels=3, output="logits").eval()
    net_log.load_state_dict(net.state_dict())
    with torch.no_grad():
        z = net_log(x)
    assert torch.allclose(z, expected.clamp_min(1e-8).log(), atol=1e-5)
    assert torch.equal(z.argmax(1), p.argmax(1))


def test_dualnet_options():
    net = tiny_dualnet(n_filters=8, n_filters_b=4, proj_dim=5)
    assert net.net_a.out_conv.in_channels == 8 and net.net_b.out_conv.in_channels == 4
    with pytest.raises(ValueError, match="output"):
        tiny_dualnet(output="softmax")


def test_dualnet_torchscript_and_trace():
    net = tiny_dualnet(output="logits", proj_dim=3).eval()
    x = x32(seed=1, size=(16, 32, 16))
    scripted = torch.jit.script(net)
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(scripted(x), expected, atol=1e-5)
        traced = torch.jit.trace(net, x, check_trace=False)
        assert torch.allclose(traced(x), expected, atol=1e-5)
        for name in ("net_a", "net_b"):  # forward_features is exported with the sub-networks
            logits, feats = getattr(scripted, name).forward_features(x)
            ref_logits, ref_feats = getattr(net, name).forward_features(x)
            assert feats.shape == (1, 3, 16, 32, 16)
            assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(feats, ref_feats, atol=1e-5)
    # the input check survives scripting (raised as a TorchScript error carrying the message)
    with pytest.raises(Exception, match="divisible by 16"):
        scripted(torch.randn(1, 1, 32, 32, 20))


@pytest.mark.parametrize("cls", NETS)
def test_dropout_train_only(cls):
    torch.manual_seed(0)
    net = small(cls, dropout=0.5, norm="instance")
    x = x32(size=(32, 16, 16))
    with torch.no_grad():
        net.train()
        assert not torch.allclose(net(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_norm_variants(cls, norm):
    net = small(cls, norm=norm, n_filters=2 if norm == "group" else 4)  # group: fewer groups than 8
    y = net.train()(x32(batch=2, size=(32, 16, 16)))
    assert y.shape == (2, 2, 32, 16, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize("cls", NETS)
def test_instance_norm_is_per_sample(cls):
    """Instance norm normalises each sample with its own statistics, in training and evaluation alike (no
    running statistics): a sample's output depends neither on the rest of the batch nor on the mode."""
    net = small(cls, norm="instance", dropout=0.0)
    x = x32(batch=2, size=(32, 32, 16))
    x[1] = 3.0 * x[1] + 2.0  # a batch partner with other statistics
    with torch.no_grad():
        both = net.train()(x)
        alone = net(x[:1])
        evaluated = net.eval()(x[:1])
    assert torch.allclose(both[:1], alone, atol=1e-5) and torch.allclose(evaluated, alone, atol=1e-5)


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("n_filters", [2, 8])
def test_group_norm_normalises_groups_of_channels(cls, n_filters):
    """Group norm with 8 groups (fewer when a layer has fewer channels: 2 channels, 2 groups; 4, 4): at
    initialisation (unit weight, zero bias) every group of channels of every sample has mean 0 and variance 1."""
    net = small(cls, norm="group", n_filters=n_filters).train()
    seen = []
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):  # clone: the ReLU after the norm works in place
            m.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        net(x32(batch=2, size=(32, 32, 32)))
    assert seen and {o.shape[1] for o in seen} >= {2 * n_filters, 16 * n_filters}
    for o in seen:
        channels = o.shape[1]
        groups = o.reshape(o.shape[0], min(8, channels), -1)
        assert groups.mean(-1).abs().max() < 1e-4, channels
        assert (groups.var(-1, unbiased=False) - 1).abs().max() < 1e-2, channels


@pytest.mark.parametrize("cls", NETS + [DualNet])
def test_unknown_norm(cls):
    with pytest.raises(ValueError, match="batch, instance, group, none"):
        cls(norm="layer")


@pytest.mark.parametrize("cls", NETS)
def test_invalid_stage_counts(cls):
    key = "stages" if cls is VNet else "blocks"
    with pytest.raises(ValueError, match=key):
        cls(n_filters=4, **{key: (1, 2, 3)})


def test_gradients_reach_first_convs():
    net = tiny_dualnet(output="logits").train()
    net(x32(batch=2, size=(32, 16, 16))).mean().backward()
    first_a = net.net_a.encoder.levels[0][0].weight
    first_b = net.net_b.encoder.levels[0][0][0].weight
    for w in (first_a, first_b):
        assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", NETS)
def test_gradients_through_projection(cls):
    net = small(cls, proj_dim=4).train()
    logits, feats = net.forward_features(x32(batch=2, size=(16, 16, 16)))
    (logits.mean() + feats.pow(2).mean()).backward()
    assert net.proj[0].weight.grad.abs().sum() > 0
    first = next(net.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", NETS)
def test_features_from_start_are_the_tail_of_the_batch(cls):
    net = small(cls, proj_dim=4).eval()
    x = x32(batch=3, size=(16, 16, 16))
    with torch.no_grad():
        logits, feats = net.forward_features(x)
        logits_2, tail = net.forward_features(x, 2)
    assert torch.equal(logits_2, logits) and tail.shape == (1, 4, 16, 16, 16)
    assert torch.allclose(tail, feats[2:], atol=1e-6)


# logits [a, b] per class on one voxel -> (mean prob, entropy, disagreement), worked out by hand:
# identical networks: no disagreement; p_a = (1/2, 1/2), p_b = (3/4, 1/4): p = (5/8, 3/8) and
# D = ((1/2 - 3/4) ln(2/3) + (1/2 - 1/4) ln 2) / 2 = ln(3) / 8; opposite certainties p_a = (0.9, 0.1),
# p_b = (0.1, 0.9): D = (0.8 ln 9 + 0.8 ln 9) / 2.
UNCERTAINTY_CASES = [
    ([0.0, 0.0], [0.0, 0.0], [0.5, 0.5], math.log(2.0), 0.0),
    ([0, 0], [math.log(3), 0], [0.625, 0.375], -0.625 * math.log(0.625) - 0.375 * math.log(0.375), math.log(3) / 8),
    ([math.log(9.0), 0.0], [0.0, math.log(9.0)], [0.5, 0.5], math.log(2.0), 0.8 * math.log(9.0)),
    ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], math.log(3.0), 0.0),
]


@pytest.mark.parametrize("za, zb, p, entropy, disagreement", UNCERTAINTY_CASES)
def test_ensemble_uncertainty_values(za, zb, p, entropy, disagreement):
    logits_a = torch.tensor(za, dtype=torch.float32).view(1, -1, 1, 1, 1).expand(2, -1, 2, 1, 3)
    logits_b = torch.tensor(zb, dtype=torch.float32).view(1, -1, 1, 1, 1).expand(2, -1, 2, 1, 3)
    out = ensemble_uncertainty(logits_a, logits_b)
    c = len(za)
    assert out.shape == (2, c + 2, 2, 1, 3)
    expected = torch.tensor([*p, entropy, disagreement]).view(1, -1, 1, 1, 1).expand_as(out)
    assert torch.allclose(out, expected, atol=1e-6)


def test_ensemble_uncertainty_extreme_logits_and_shape_check():
    za = torch.tensor([60.0, -60.0]).view(1, 2, 1, 1, 1)
    out = ensemble_uncertainty(za, -za)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 2], torch.full((1, 1, 1, 1), math.log(2.0)), atol=1e-6)
    assert torch.allclose(out[:, 3], torch.full((1, 1, 1, 1), 120.0), rtol=1e-5)  # each KL is about 120
    with pytest.raises(ValueError, match=r"same shape, found \(1, 2, 1, 1, 1\) and \(1, 3, 1, 1, 1\)"):
        ensemble_uncertainty(za, torch.zeros(1, 3, 1, 1, 1))


@pytest.mark.parametrize("out_channels", [2, 3])
def test_dualnet_uncertainty_output(out_channels):
    net = tiny_dualnet(out_channels=out_channels, output="uncertainty").eval()
    x = x32(seed=2, size=(16, 16, 32))
    with torch.no_grad():
        out = net(x)
        pa, pb = torch.softmax(net.net_a(x), 1), torch.softmax(net.net_b(x), 1)
        net.output = "prob"  # the mode is switched on the built instance, the weights stay
        prob = net(x)
    c = out_channels
    assert out.shape == (1, c + 2, 16, 16, 32)
    assert torch.allclose(out[:, :c], prob, atol=1e-6)
    entropy = -(prob * prob.log()).sum(1)
    kl_ab = (pa * (pa.log() - pb.log())).sum(1)
    kl_ba = (pb * (pb.log() - pa.log())).sum(1)
    assert torch.allclose(out[:, c], entropy, atol=1e-5)
    assert torch.allclose(out[:, c + 1], 0.5 * (kl_ab + kl_ba), atol=1e-5)
    assert out[:, c].min() >= 0 and out[:, c].max() <= math.log(c) + 1e-6
    assert out[:, c + 1].min() >= 0 and out[:, c + 1].max() > 0


def test_dualnet_uncertainty_torchscript_and_unknown_mode():
    net = tiny_dualnet(output="uncertainty").eval()
    x = x32(seed=3, size=(16, 32, 16))
    scripted = torch.jit.script(net)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)
        scripted.output = "prob"
        assert scripted(x).shape == (1, 2, 16, 32, 16)
    net.output = "variance"
    with pytest.raises(ValueError, match="unknown output 'variance'; expected one of prob, logits, uncertainty"):
        net(x)
