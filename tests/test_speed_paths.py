"""The speed settings: channels_last_3d networks end to end, the configs' memory_format and num_threads.

Behaviour only (no timing): every layer keeps the format it is asked for, outputs and gradients equal
the default format's within float rounding, and the config values reach the networks, the inferers'
windows and torch's thread count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

import monai_dualssl
from monai_dualssl.config import ConfigError, check_config
from monai_dualssl.inference import fast_inferer, field_inferer
from monai_dualssl.networks import DualNet, ResNetVNet, VNet, resolve_memory_format, set_num_threads

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
SMALL = dict(n_filters=4, resnet_blocks=(1, 1, 1, 1), vnet_stages=(1, 1, 1, 1, 1), proj_dim=3)
CL = torch.channels_last_3d
NETS = (ResNetVNet, VNet)


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL)


def _pair(**kwargs) -> tuple[DualNet, DualNet]:
    """The same weights in the default format and in channels_last."""
    torch.manual_seed(0)
    ref = DualNet(**SMALL, **kwargs)
    fast = DualNet(**SMALL, **kwargs, memory_format="channels_last")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _record_formats(net: torch.nn.Module, channels_last: bool = True) -> list:
    """Forward hooks noting every 5-D output of every layer not in the expected format. The classifiers
    (``out_conv``) and the networks themselves return class maps, which are always in the default layout."""
    found: list = []

    def hook(name):
        def check(module, inputs, output):
            class_maps = name.endswith("out_conv") or isinstance(module, (DualNet, *NETS))
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if not (torch.is_tensor(t) and t.dim() == 5 and t.shape[1] > 1):
                    continue
                if (t.is_contiguous() if class_maps else _is_cl(t) == channels_last) is False:
                    found.append((name, type(module).__name__, tuple(t.shape), t.stride()))
        return check

    for name, m in net.named_modules():
        m.register_forward_hook(hook(name))
    return found


@pytest.mark.parametrize("train", [True, False])
def test_every_layer_keeps_channels_last(train):
    _, net = _pair()
    net.train(train)
    wrong = _record_formats(net)
    x = torch.randn(3, 1, 32, 32, 32)
    z_a, f_a = net.net_a.forward_features(x, 1)
    z_b, f_b = net.net_b.forward_features(x, 1)
    assert wrong == []
    assert _is_cl(f_a) and _is_cl(f_b)  # projected features: channels_last, like every feature map
    assert z_a.is_contiguous() and z_b.is_contiguous()  # class maps: the default layout, as the losses use
    (z_a.sum() + f_a.sum() + z_b.sum() + f_b.sum()).backward()
    for name, p in net.named_parameters():
        if p.dim() == 5:
            assert _is_cl(p) and _is_cl(p.grad), name
    assert net.eval()(x).is_contiguous()


def test_default_format_unchanged():
    ref, _ = _pair()
    wrong = _record_formats(ref, channels_last=False)
    out = ref.eval()(torch.randn(1, 1, 32, 32, 32))
    assert out.is_contiguous() and wrong == []
    assert all(p.is_contiguous() for p in ref.parameters())


@pytest.mark.parametrize("output", ["prob", "logits", "uncertainty"])
def test_outputs_equal_default_format(output):
    ref, fast = _pair(output=output)
    x = torch.randn(2, 1, 32, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_gradients_equal_default_format():
    ref, fast = _pair(dropout=0.0)
    x = torch.randn(3, 1, 32, 32, 32)
    for net in (ref, fast):
        net.train()
        z, f = net.net_a.forward_features(x, 1)
        z2, f2 = net.net_b.forward_features(x, 1)
        (z.square().mean() + f.mean() + z2.square().mean() + f2.mean()).backward()
    # float32 rounding differs between the layouts' kernels (BatchNorm over 3 tiny samples amplifies it)
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g_fast = torch.cat([p.grad.flatten() for p in fast.parameters()])
    assert float((g_fast - g_ref).norm() / g_ref.norm()) < 2e-3
    for p, q in zip(ref.parameters(), fast.parameters()):
        assert float((q.grad - p.grad).norm()) <= 1e-2 * float(p.grad.norm()) + 1e-5  # biases before a norm: ~0


def test_set_memory_format_keeps_parameters_and_loads_either_way():
    ref, fast = _pair()
    params = list(fast.parameters())
    fast.set_memory_format("contiguous")
    assert all(a is b for a, b in zip(params, fast.parameters()))
    assert not fast.net_a.channels_last
    fast.set_memory_format("channels_last")
    fast.load_state_dict(ref.state_dict())  # a contiguous state_dict into a channels_last network
    assert all(_is_cl(p) for p in fast.parameters() if p.dim() == 5)
    ref.load_state_dict(fast.state_dict())  # and back
    with pytest.raises(ValueError, match="memory_format"):
        DualNet(**SMALL, memory_format="auto")


def test_torchscript_channels_last():
    _, fast = _pair(output="uncertainty")
    fast.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    scripted = torch.jit.script(fast)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), fast(x))
        torch.testing.assert_close(scripted.net_a.forward_features(x, 0)[1], fast.net_a.forward_features(x, 0)[1])


def test_resolve_memory_format():
    assert resolve_memory_format("auto", "cpu") == "channels_last"
    assert resolve_memory_format("auto", torch.device("cuda:0")) == "contiguous"
    assert resolve_memory_format("contiguous", "cpu") == "contiguous"
    assert resolve_memory_format("channels_last", "cuda") == "channels_last"
    with pytest.raises(ValueError, match="memory_format"):
        resolve_memory_format("channels_first", "cpu")


@pytest.mark.parametrize("inferer", [field_inferer((32, 32, 32), (8, 8, 8)), fast_inferer((32, 32, 32), sw_batch_size=3)])
def test_sliding_window_channels_last_equals_default(inferer):
    ref, fast = _pair()
    image = torch.randn(1, 1, 45, 40, 36)
    seen = []
    fast.net_a.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        torch.testing.assert_close(inferer(image, fast.eval()), inferer(image, ref.eval()), rtol=1e-4, atol=1e-5)
    assert seen  # the windows went through the channels_last network


def _parser(files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update({"bundle_root": str(CONFIGS.parent), **overrides})
    return parser


@pytest.mark.parametrize("files", [["train.yaml"], ["train.yaml", "la.yaml", "la_cpu.yaml"],
                                   ["train.yaml", "evaluate.yaml"], ["inference.json"]])
@pytest.mark.parametrize("fmt, expected", [("auto", True), ("contiguous", False), ("channels_last", True)])
def test_config_memory_format_reaches_networks(files, fmt, expected):
    net = _parser(files, memory_format=fmt, device="$torch.device('cpu')").get_parsed_content("network")
    assert net.net_a.channels_last is expected and net.net_b.channels_last is expected
    assert all(_is_cl(p) if expected else p.is_contiguous() for p in net.parameters() if p.dim() == 5)
    assert any(not p.is_contiguous() for p in net.parameters()) is expected


def test_config_auto_is_contiguous_on_cuda_device():
    parser = _parser(["train.yaml"], device="$torch.device('cuda:0')")
    assert parser.get_parsed_content("network_def#memory_format") == "contiguous"


@pytest.mark.parametrize("files, step", [(["train.yaml"], "initialize"), (["train.yaml", "evaluate.yaml"], "initialize"),
                                         (["inference.json"], "initialize")])
def test_config_num_threads_applied(files, step):
    parser = _parser(files, num_threads=1)
    steps = parser[step]
    index = next(i for i, s in enumerate(steps) if "set_num_threads(@num_threads)" in s)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parser.get_parsed_content(f"{step}#{index}")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_multi_gpu_config_sets_threads():
    steps = _parser(["train.yaml", "multi_gpu_train.yaml"])["initialize"]
    assert any("set_num_threads(@num_threads)" in s for s in steps)


def test_set_num_threads_default(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_num_threads(None) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_num_threads(None) >= 1
        assert set_num_threads(1) == 1
        with pytest.raises(ValueError):
            set_num_threads(-1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("key, value, message", [("memory_format", "channel_last", "memory_format"),
                                                 ("num_threads", "two", "num_threads")])
def test_check_config_rejects(key, value, message):
    parser = _parser(["train.yaml"], **{key: value})
    with pytest.raises(ConfigError, match=message):
        check_config(parser)


def test_check_config_accepts_speed_keys():
    check_config(_parser(["train.yaml"], memory_format="channels_last", num_threads=1))
    assert "memory_format" in monai_dualssl.config.RESUMABLE_CHANGES
    assert "num_threads" in monai_dualssl.config.RESUMABLE_CHANGES


def test_gradient_reaches_the_decoder_channels_last():
    """A loss on the unlabeled samples' projected features (a slice) sends a channels_last gradient back into the
    decoder, whatever layout the loss's own gradient has."""
    _, net = _pair()
    net.train()
    grads = []
    net.net_b.decoder.register_forward_hook(lambda m, i, out: [out.register_hook(grads.append)] and None)
    z, f = net.net_b.forward_features(torch.randn(3, 1, 32, 32, 32), 1)
    assert f.shape[0] == 2
    (z.square().mean() + f.flatten(2).contiguous().square().mean()).backward()
    assert len(grads) == 1 and _is_cl(grads[0])


def test_released_loop_of_the_inference_benchmark_is_the_field_protocol():
    """bench_inference.py's reference (the released code's loop, timed against ours) does the same work: the
    same probabilities as the bundle's field protocol, with one axis shorter than the window (padded)."""
    sys.path.insert(0, str(CONFIGS.parents[1] / "benchmarks"))
    from bench_inference import released_field

    torch.manual_seed(3)
    ref, _ = _pair()
    ref.eval()
    image = torch.rand(1, 1, 45, 37, 13)
    patch, strides = [32, 32, 16], [9, 7, 3]
    with torch.no_grad():
        probs = field_inferer(patch, strides)(image, lambda w: (ref.net_a(w).softmax(1) + ref.net_b(w).softmax(1)) / 2)
    released = released_field(ref, image, patch, strides)
    assert released.shape == (2, 45, 37, 13)
    torch.testing.assert_close(torch.from_numpy(released), probs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags", [["--skip_largest"], ["--protocols", "fast"]])
def test_released_comparison_is_refused_where_it_would_time_nothing(tmp_path, flags):
    import subprocess

    (tmp_path / "train.list").write_text("case\n")
    script = CONFIGS.parents[1] / "benchmarks" / "bench_inference.py"
    result = subprocess.run([sys.executable, str(script), "--dataset_dir", str(tmp_path), "--released", *flags],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--released times the field protocol on the largest volume" in result.stderr
