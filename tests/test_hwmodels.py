import json
import math

import pytest
from torch import nn
from typer.testing import CliRunner

import autocompress.cli.hw_cmds  # noqa: F401  (registers the commands)
from autocompress.cli.app import app
from autocompress.errors import UnknownNameError, UserInputError
from autocompress.hwmodels import TARGETS, Target, get_target, predict, target_names
from autocompress.hwmodels.calibrate import (Sample, calibrate_from_csv, fit_target, layer_table, llc_choices,
                                             network_scales,
                                             read_csv_samples)
from autocompress.hwmodels.fusion import structure
from autocompress.hwmodels.published import PUBLISHED, TOLERANCE
from autocompress.hwmodels.target import KERNEL_CLASSES
from autocompress.models import load_model
from autocompress.space.costs import CostTable
from autocompress.space.graph import trace

BUILTIN = ("mobile", "rpi4", "x86-server", "gpu", "local")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """No calibrated file from the user's cache may change what the built-ins predict."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))


def table_of(model: nn.Module, shape) -> CostTable:
    return CostTable.from_graph(trace(model.eval(), shape))


_TABLES: dict[str, CostTable] = {}


def spec_table(spec: str) -> CostTable:
    if spec not in _TABLES:
        lm = load_model(spec)
        _TABLES[spec] = table_of(lm.model, lm.input_shape)
    return _TABLES[spec].copy()


def with_bits(table: CostTable, bits: int) -> CostTable:
    t = table.copy()
    for r in t:
        if r.op in ("conv", "linear"):
            r.wbits = r.abits = bits
    return t


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(16, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU())


# ---- registry ---------------------------------------------------------------------------------

def test_builtin_targets_are_documented_data():
    assert set(BUILTIN) <= set(TARGETS.names())
    for name in TARGETS.names():
        t = get_target(name)
        assert t.name == name and t.description and t.sources
        assert set(KERNEL_CLASSES) <= set(t.efficiency)
        assert all(v > 0 for v in t.peak_gmacs.values())
        assert Target.from_json(json.loads(json.dumps(t.to_json()))) == t


def test_unknown_target_lists_the_valid_names():
    with pytest.raises(UnknownNameError) as err:
        get_target("tpu-v9")
    assert all(n in str(err.value) for n in BUILTIN)


def test_uncalibrated_local_says_so():
    local = get_target("local")
    assert local.calibrated is False and "uncalibrated" in local.description
    assert local.threads == 1


# ---- the model ----------------------------------------------------------------------------------

def test_conv_bn_relu_is_one_kernel():
    fused = table_of(small_cnn()[:3], (1, 16, 28, 28))
    conv_only = table_of(nn.Sequential(nn.Conv2d(16, 64, 3, padding=1, bias=False)), (1, 16, 28, 28))
    for name in BUILTIN:
        p = predict(fused, name)
        by_op = {l.op: l for l in p.layers}
        assert by_op["bn"].latency_ms == 0 and by_op["act"].latency_ms == 0
        assert by_op["bn"].fused_into == by_op["conv"].name == by_op["act"].fused_into
        # Same total as the conv alone: no extra kernel overheads or BN/ReLU passes.
        assert p.latency_ms == pytest.approx(predict(conv_only, name).latency_ms, rel=1e-9)
        assert p.latency_ms == pytest.approx(by_op["conv"].latency_ms + get_target(name).call_overhead_us / 1e3)


def test_an_activation_with_a_second_reader_is_not_fused():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.act(y) + y  # the conv output is read twice: no fusion, the add pays too

    p = predict(table_of(TwoReaders(), (1, 8, 16, 16)), "mobile")
    by_op = {l.op: l for l in p.layers}
    assert by_op["act"].latency_ms > 0 and by_op["add"].latency_ms > 0


def test_unfused_elementwise_ops_cost_traffic_and_overhead():
    t = spec_table("builtin:digits-net")
    p = predict(t, "mobile")
    mobile = get_target("mobile")
    concat = [l for l in p.layers if l.op == "concat"]
    pools = [l for l in p.layers if l.op == "pool"]
    assert concat and pools
    assert all(l.latency_ms > mobile.elementwise_overhead_us / 1e3 for l in concat + pools)


def test_int8_is_faster_only_where_the_target_has_fast_int8():
    t = spec_table("torchvision:resnet18")
    speedup = {n: predict(t, n).latency_ms / predict(with_bits(t, 8), n).latency_ms for n in BUILTIN}
    assert speedup["mobile"] > 1.5
    assert speedup["x86-server"] > 1.5
    assert 1.3 <= speedup["rpi4"] <= 2.0  # ncnn's Pi 4 int8 tables since 2022: 1.10-1.91x (docs/int8-ratios.md)
    no_int8 = get_target("rpi4").with_(fast_int8=False)
    assert 0.9 <= predict(t, no_int8).latency_ms / predict(with_bits(t, 8), no_int8).latency_ms <= 1.2  # float kernels


def test_pruning_half_the_channels_lowers_the_layer_latency():
    from autocompress.compress import estimate
    from autocompress.space.policy import Policy
    from autocompress.compress import build_space

    lm = load_model("builtin:digits-net")
    space = build_space(trace(lm.model, lm.input_shape), "builtin:digits-net")
    decision = next(d for d in space.of_kind("prune") if 0.5 in d.choices)
    base = estimate(space, Policy.identity(space))
    pruned = estimate(space, Policy(space.model, space.fingerprint, {decision.id: 0.5}))
    layer = base.by_target(decision.layers[0]).name
    assert pruned[layer].out_ch < base[layer].out_ch
    for name in BUILTIN:
        before, after = predict(base, name), predict(pruned, name)
        assert after.layer(layer).latency_ms < before.layer(layer).latency_ms
        assert after.latency_ms < before.latency_ms


def test_energy_decreases_with_bit_width():
    t = spec_table("builtin:digits-net")
    for name in BUILTIN:
        energies = [predict(with_bits(t, b), name).energy_mj for b in (32, 16, 8, 4)]
        assert all(a > b for a, b in zip(energies, energies[1:])), (name, energies)


def test_four_bit_weights_cut_weight_memory_not_compute_class():
    t = spec_table("builtin:digits-net")
    w8, w4 = with_bits(t, 8), with_bits(t, 8)
    for r in w4:
        if r.op in ("conv", "linear"):
            r.wbits = 4
    p8, p4 = predict(w8, "mobile"), predict(w4, "mobile")
    assert p4.weight_bytes < p8.weight_bytes
    assert p4.latency_ms <= p8.latency_ms


def test_depthwise_runs_at_a_lower_fraction_of_peak():
    dense = table_of(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), (1, 64, 28, 28))
    dw = table_of(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64)), (1, 64, 28, 28))
    for name in BUILTIN:
        rate = lambda tb: sum(r.macs for r in tb) / predict(tb, name).latency_ms  # noqa: E731
        assert rate(dw) < rate(dense)


def test_memory_footprint_comes_from_the_cost_table():
    t = spec_table("builtin:digits-net")
    totals = t.totals()
    p = predict(t, "mobile")
    assert p.weight_bytes == totals["weight_bytes"]
    assert p.peak_activation_bytes == totals["peak_activation_bytes"]
    assert len(p.layers) == len(t) and [l.name for l in p.layers] == [r.name for r in t]
    assert sum(l.latency_ms for l in p.layers) + get_target("mobile").call_overhead_us / 1e3 == pytest.approx(p.latency_ms)
    assert sum(l.energy_mj for l in p.layers) == pytest.approx(p.energy_mj)


def test_gpu_batch_amortises_launch_overhead():
    t = spec_table("torchvision:resnet18")
    one, many = predict(t, "gpu", batch=1), predict(t, "gpu", batch=64)
    assert many.latency_ms < 64 * one.latency_ms / 4  # small batches are overhead-bound
    assert many.latency_ms > one.latency_ms
    launches = sum(l.latency_ms > 0 for l in one.layers) * get_target("gpu").kernel_overhead_us / 1e3
    assert launches > 0.3 * one.latency_ms


@pytest.mark.parametrize("ref", PUBLISHED, ids=lambda r: f"{r.target}-{r.model.split(':')[1]}")
def test_builtin_targets_match_published_measurements(ref):
    t = with_bits(spec_table(ref.model), ref.bits)
    pred = predict(t, ref.target, batch=ref.batch).latency_ms
    assert abs(pred / ref.latency_ms - 1) <= TOLERANCE, (pred, ref.latency_ms, ref.source)


def test_published_checks_cover_the_four_fixed_targets():
    assert {r.target for r in PUBLISHED} == {"mobile", "rpi4", "x86-server", "gpu"}


# ---- the QDQ graph and layouts of `local` (ONNX Runtime) -----------------------------------------

def _pool_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(16, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.Conv2d(width, 64, 3, padding=1))


def _set_bits(table: CostTable, bits: dict[str, int]) -> CostTable:
    for r in table:
        if r.name in bits:
            r.wbits = r.abits = bits[r.name]
    return table


def _conv_names(table: CostTable) -> list[str]:
    return [r.name for r in table if r.op == "conv"]


def test_parts_add_up_to_the_latency():
    t = with_bits(spec_table("builtin:digits-net"), 8)
    for name in BUILTIN:
        p = predict(t, name)
        assert sum(p.parts.values()) + get_target(name).call_overhead_us / 1e3 == pytest.approx(p.latency_ms, rel=1e-9)
        assert sum(l.latency_ms for l in p.layers) == pytest.approx(sum(p.parts.values()), rel=1e-9)


def test_a_float_pool_read_by_an_int8_conv_is_the_slow_int8_pool():
    """ONNX Runtime moves the QuantizeLinear above a max-pool and pools uint8 in NCHW (~15-20 ns per output
    element measured)."""
    base = table_of(_pool_net(64), (1, 16, 56, 56))
    first, second = _conv_names(base)
    pool = lambda bits: predict(_set_bits(base.copy(), bits), "local").parts["pool"]
    float_then_int8 = pool({second: 8})
    int8_both = pool({first: 8, second: 8})
    all_float = pool({})
    # 64 x 28 x 28 output elements at int8_pool_ns each, on top of the pool's traffic
    slow = 64 * 28 * 28 * get_target("local").int8_pool_ns / 1e6
    assert float_then_int8 == pytest.approx(all_float + slow, rel=0.05)
    assert int8_both < all_float  # between int8 kernels it pools int8 NHWC tensors: no penalty, fewer bytes


def test_a_pool_runs_uint8_exactly_when_its_input_is_quantised():
    """A max-pool runs uint8 when its input is quantised: when an int8 kernel reads that input beside it, or
    when the pool is its only reader and an int8 kernel reads the pool."""

    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU())
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.a = nn.Conv2d(64, 32, 1)
            self.b = nn.Conv2d(64, 32, 3, 2, 1)

        def forward(self, x):
            y = self.stem(x)
            return self.a(self.pool(y)) + self.b(y)

    base = table_of(Fork(), (1, 16, 56, 56))
    stem, a, b = _conv_names(base)
    pools = lambda bits: [o.slow_pool_elements for o in structure(_set_bits(base.copy(), bits), get_target("local")).ops]
    assert sum(pools({a: 8})) == 0  # b reads the pool's input in float: the pool runs in float
    assert sum(pools({a: 8, b: 8})) == 64 * 28 * 28  # every reader int8: the slow uint8 pool
    # b in int8 quantises the pool's input for every reader, so the pool runs uint8 even though a reads
    # it in float (a DequantizeLinear after the pool): GoogLeNet's pool branches beside an int8 branch.
    assert sum(pools({b: 8})) == 64 * 28 * 28
    st = structure(_set_bits(base.copy(), {b: 8}), get_target("local"))
    assert next(k for k in st.kernels if k.head == a).conversions == 2  # DQ of the pool, DQ of b's output for the add


def test_a_pool_of_an_nchw_int8_tensor_is_the_slow_uint8_pool():
    """ONNX Runtime runs an int8 op in NHWC only where its input comes from an int8 kernel: a pool of a
    single-input int8 concat (QLinearConcat in NCHW), or of another uint8 NCHW pool, pools uint8 in NCHW
    (SqueezeNet and GoogLeNet variants, profiled), while a multi-input concat of int8 convs stays NHWC."""

    class Cat(nn.Module):
        def __init__(self, branches: int) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(16, 32, 3, padding=1) for _ in range(branches))
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.pool2 = nn.MaxPool2d(3, 1, 1)
            self.head = nn.Conv2d(32 * branches, 16, 1)

        def forward(self, x):
            import torch

            return self.head(self.pool2(self.pool(torch.cat([c(x) for c in self.convs], 1))))

    local = get_target("local")

    def slow_pools(branches: int) -> list[int]:
        base = table_of(Cat(branches), (1, 16, 56, 56))
        bits = {n: 8 for n in _conv_names(base) if n != "head"}
        return [o.slow_pool_elements for o in structure(_set_bits(base, bits), local).ops if o.name.startswith("pool")]

    assert slow_pools(1) == [32 * 28 * 28, 32 * 28 * 28]  # the concat's pool and the pool of that pool
    assert slow_pools(2) == [0, 0]  # both inputs NHWC from int8 convs: NHWC pools


def test_a_layer_that_runs_in_float_reads_float_weights_and_activations():
    """Bits that do not change the kernel do not change its traffic: a layer with 8-bit weights but float
    activations is deployed as a float conv (fp32 weights), and 16-bit activations run in fp32 where the
    target has no fast fp16."""
    # weight-bound layers (a 1x1 conv on 7x7 positions, a matrix-vector product): bytes decide
    base = table_of(nn.Sequential(nn.Conv2d(512, 1024, 1), nn.ReLU(), nn.Flatten(), nn.Linear(1024 * 49, 256)),
                    (1, 512, 7, 7))
    names = [r.name for r in base if r.op in ("conv", "linear")]
    fp32 = predict(base.copy(), "local").latency_ms
    for wbits, abits in ((8, 32), (4, 32), (16, 16), (32, 16)):
        t = base.copy()
        for r in t:
            if r.name in names:
                r.wbits, r.abits = wbits, abits
        assert predict(t, "local").latency_ms == pytest.approx(fp32, rel=1e-9), (wbits, abits)
    # on a target with fast fp16 the 16-bit layers do read half the bytes
    gpu16 = base.copy()
    for r in gpu16:
        if r.name in names:
            r.wbits, r.abits = 16, 16
    assert predict(gpu16, "gpu").latency_ms < predict(base.copy(), "gpu").latency_ms


def test_each_float_reader_of_a_quantised_tensor_dequantises():
    """The quantiser puts one Q/DQ pair on a tensor for all its readers; ONNX Runtime gives every float
    reader its own DequantizeLinear. One QuantizeLinear per tensor."""

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(16, 32, 3, padding=1)
            self.a = nn.Conv2d(32, 32, 1)
            self.b = nn.Conv2d(32, 32, 1)
            self.c = nn.Conv2d(32, 32, 1)

        def forward(self, x):
            y = self.stem(x)
            return self.a(y) + self.b(y) + self.c(y)

    base = table_of(Split(), (1, 16, 28, 28))
    stem, a, b, c = _conv_names(base)

    def conversions(bits, target):
        st = structure(_set_bits(base.copy(), bits), target)
        return sum(k.conversions for k in st.kernels) + sum(o.conversions for o in st.ops)

    local = get_target("local")
    assert conversions({a: 8}, local) == 1 + 2 + 1  # Q of y; DQ for b and c; DQ of a's output for the add
    assert conversions({a: 8}, local.with_(dq_per_reader=False)) == 1 + 1
    assert conversions({stem: 8}, local) == 1 + 3  # the input's Q; each of a, b, c dequantises y


def test_convs_on_unaligned_channels_run_plain_kernels():
    """ONNX Runtime runs a float conv in NCHWc only when its input channels are a multiple of 4 (a dense
    conv also with fewer input channels than a block); else im2col + GEMM, per channel for depthwise."""
    local = get_target("local")

    def run(cin: int, cout: int, groups: int, target=local):
        t = table_of(nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups)), (1, cin, 28, 28))
        return structure(t, target).kernels[0].plain, predict(t, target).latency_ms

    assert run(60, 60, 60)[0] is False and run(58, 58, 58)[0] is True
    assert run(64, 64, 1)[0] is False and run(3, 64, 1)[0] is False and run(29, 64, 1)[0] is True
    assert run(32, 30, 1)[0] is False  # only the input's alignment matters; the output is padded
    # 58 depthwise channels are fewer MACs than 60, but the plain kernel is several times slower.
    assert run(58, 58, 58)[1] > 2 * run(60, 60, 60)[1]
    assert run(58, 58, 58, get_target("mobile"))[1] <= run(60, 60, 60, get_target("mobile"))[1]


def test_a_windowed_pool_on_whole_blocks_runs_blocked():
    """A max-pool on a multiple of 16 channels runs NCHWc, behind a reorder if its input is plain; on
    partial blocks it runs plain at ``plain_pool_ns`` per output element."""
    local = get_target("local")

    def pool_elem(width: int):
        net = nn.Sequential(nn.Conv2d(29, width, 1), nn.ReLU(), nn.MaxPool2d(3, 1, 1))  # 29 inputs: a plain conv
        st = structure(table_of(net, (1, 29, 28, 28)), local)
        return next(o for o in st.ops if o.name == "_2")

    blocked, plain = pool_elem(64), pool_elem(72)
    assert blocked.plain_pool_elements == 0 and blocked.reorders == 1  # blocked pool, one reorder of its plain input
    assert plain.plain_pool_elements == 72 * 28 * 28 and plain.reorders == 0


def test_partial_channel_blocks_reorder_around_a_pool():
    """A 24-channel conv output is padded in NCHWc; the pool after it runs plain, behind a reorder."""
    whole = predict(table_of(_pool_net(32), (1, 16, 28, 28)), "local").parts
    partial = predict(table_of(_pool_net(24), (1, 16, 28, 28)), "local").parts
    assert partial["reorder"] > whole["reorder"]
    assert predict(table_of(_pool_net(24), (1, 16, 28, 28)), "mobile").parts["reorder"] == 0  # no layout model


def test_int8_region_boundaries_cost_conversions():
    base = table_of(small_cnn(), (1, 16, 28, 28))
    names = _conv_names(base)
    middle_int8 = predict(_set_bits(base.copy(), {names[1]: 8}), "local").parts
    all_int8 = predict(_set_bits(base.copy(), dict.fromkeys(names, 8)), "local").parts
    assert middle_int8["convert"] > 0 and middle_int8["qconv"] > 0
    # two boundaries (float -> int8 -> float) against one (the input's quantise, the output's dequantise)
    assert middle_int8["convert"] > all_int8["convert"] * 0.5
    assert all_int8["conv"] == 0 and all_int8["qconv"] > 0


def test_weights_come_from_the_level_the_whole_model_fits():
    """A 2 MB classifier timed alone keeps its weights in the last-level cache between calls; behind 64 MB
    of other weights it reads them from DRAM every call."""
    local = get_target("local")
    alone = table_of(nn.Sequential(nn.Linear(512, 1000)), (1, 512))
    behind = table_of(nn.Sequential(nn.Linear(512, 4096), nn.Linear(4096, 4096), nn.Linear(4096, 512),
                                    nn.Linear(512, 1000)), (1, 512))

    def classifier_ms(table, target):
        return predict(table, target).layers[-1].latency_ms

    assert structure(alone, local).kernels[0].weight_level == 1  # 2 MB: the last-level cache
    assert structure(behind, local).kernels[-1].weight_level == 2  # the model's 76 MB: DRAM
    one_layer_levels = local.with_(model_weights_level=False, cold_outputs=False)
    assert classifier_ms(alone, local) == pytest.approx(classifier_ms(behind, one_layer_levels))
    # 2 MB at the DRAM instead of the LLC bandwidth (the GEMV is memory-bound)
    assert classifier_ms(behind, local) == pytest.approx(classifier_ms(alone, local) * local.llc_gbs / local.dram_gbs,
                                                         rel=0.2)


def test_outputs_are_written_at_the_level_of_the_bytes_a_call_touches():
    """A 1.6 MB depthwise output timed alone is rewritten in the last-level cache every call; behind 64 MB of
    weights the call touches more than that cache holds, so the same layer writes its output to DRAM (its
    input, just written by the layer before, and its weights keep their own levels)."""
    local = get_target("local")
    local = local.with_(peak_gmacs={d: 100 * v for d, v in local.peak_gmacs.items()})  # memory-bound
    layer = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32))
    alone = table_of(layer, (1, 32, 112, 112))
    behind = table_of(nn.Sequential(*layer, nn.Flatten(), nn.Linear(32 * 112 * 112, 40)), (1, 32, 112, 112))
    k_alone, k_behind = structure(alone, local).kernels[0], structure(behind, local).kernels[0]
    assert k_alone.output_bytes == k_behind.output_bytes == 32 * 112 * 112 * 4
    assert k_alone.output_level == 1 and k_behind.output_level == 2
    assert k_alone.memory_level == k_behind.memory_level == 1

    def depthwise_ms(table, target):
        return next(r.latency_ms for r in predict(table, target).layers if r.name == k_alone.head)

    assert depthwise_ms(behind, local.with_(cold_outputs=False, model_weights_level=False)) == pytest.approx(
        depthwise_ms(alone, local))
    # the output's 1.6 MB at the DRAM instead of the LLC bandwidth
    extra_us = k_alone.output_bytes * (1 / local.dram_gbs - 1 / local.llc_gbs) / 1e3
    assert depthwise_ms(behind, local) - depthwise_ms(alone, local) == pytest.approx(extra_us / 1e3, rel=0.05)
    assert structure(behind, get_target("mobile")).kernels[0].output_level == structure(
        behind, get_target("mobile")).kernels[0].memory_level  # fixed targets keep one level per kernel


def test_the_fit_chooses_the_cache_size_that_explains_the_measurements():
    """Latencies made by a target with an 8 MiB last-level cache: of 2, 8 and 32 MiB the fit keeps 8."""
    truth = get_target("local").with_(llc_bytes=8 << 20)
    samples = []
    for c, hw in ((64, 56), (128, 56), (256, 28), (512, 14), (96, 112), (160, 112), (256, 56)):
        for k, g in ((1, 1), (3, c)):
            t = table_of(nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=g)), (1, c, hw, hw))
            samples.append(Sample(f"{c}@{hw} k{k} g{g}", t, predict(t, truth).latency_ms))
    for cin, cout in ((512, 1000), (1024, 1024), (2048, 1024), (2048, 2048), (4096, 1024)):
        t = table_of(nn.Sequential(nn.Linear(cin, cout)), (1, cin))
        samples.append(Sample(f"linear {cin}->{cout}", t, predict(t, truth).latency_ms))
    fitted = fit_target(get_target("local"), samples, llc_choices=[2 << 20, 8 << 20, 32 << 20])
    assert fitted.llc_bytes == 8 << 20
    assert fitted.fit["within_5"] >= 0.9
    assert "llc_bytes" in fitted.sources


def test_memory_overlap_adds_part_of_the_shorter_of_compute_and_memory_and_the_fit_follows_it():
    """A kernel takes max(compute, memory) + memory_overlap x min(compute, memory). Fitted on latencies made
    with 0.7 or with 0, the fit moves the default's 0.3 towards each and reproduces them (single layers leave
    it traded against bandwidths, so not to the digit); a target that does not set it does not fit it."""
    local = get_target("local")
    assert local.memory_overlap > 0 and get_target("mobile").memory_overlap == 0
    t = table_of(nn.Sequential(nn.Conv2d(96, 96, 3, padding=1, groups=96)), (1, 96, 112, 112))
    overlapped, roofline = (predict(t, local.with_(memory_overlap=m)).latency_ms for m in (0.5, 0.0))
    assert overlapped > 1.01 * roofline

    def made_with(overlap: float) -> list[Sample]:
        truth, samples = local.with_(memory_overlap=overlap), []
        for c, hw in ((64, 56), (128, 56), (256, 28), (512, 14), (96, 112), (160, 112), (256, 56), (32, 112)):
            for k, g in ((1, 1), (3, c), (3, 1)):
                t = table_of(nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=g)), (1, c, hw, hw))
                samples.append(Sample(f"{c}@{hw} k{k} g{g}", t, predict(t, truth).latency_ms))
        return samples

    with_overlap = made_with(0.7)
    fitted, without = fit_target(local, with_overlap), fit_target(local.with_(memory_overlap=0.0), with_overlap)
    assert fitted.memory_overlap > 0.35 and "memory_overlap" in fitted.sources["fitted"]
    assert fitted.fit["rmspe"] < 0.2 * without.fit["rmspe"] and "memory_overlap" not in without.sources["fitted"]
    assert fit_target(local, made_with(0.0)).memory_overlap < 0.1


def test_the_fit_follows_the_heavier_samples_and_layer_weight_applies_to_single_layers():
    """Two sets of the same configurations disagree by 1.5x: the fit lands near the set that carries
    the weight, whether given per sample or, for single-layer tables, by ``layer_weight``."""
    from autocompress.hwmodels.calibrate import single_layer

    truth = get_target("local")
    heavy, light, nets = [], [], []
    for c, hw in ((64, 56), (128, 28), (256, 14), (32, 112), (96, 56)):
        for k, g in ((1, 1), (3, 1), (3, c)):
            t = table_of(nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=g), nn.ReLU()), (1, c, hw, hw))
            ms = predict(t, truth).latency_ms
            heavy.append(Sample(f"{c}@{hw} k{k} g{g}", t, ms, weight=1.0))
            light.append(Sample(f"{c}@{hw} k{k} g{g} slow", t, 1.5 * ms, weight=0.05))
        t = table_of(nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(),
                                   nn.Conv2d(c, c, 1)), (1, c, hw, hw))
        nets.append(Sample(f"block {c}@{hw} slow", t, 1.5 * predict(t, truth).latency_ms))

    def median_ratio(fitted, samples):
        ratios = sorted(predict(s.table, fitted).latency_ms / s.measured_ms for s in samples)
        return ratios[len(ratios) // 2]

    assert median_ratio(fit_target(truth, heavy + light), heavy) == pytest.approx(1.0, abs=0.08)
    # layers at full weight pull toward themselves; at 0.02 the (1.5x slower) networks decide
    assert median_ratio(fit_target(truth, heavy + nets), heavy) < 1.3
    assert median_ratio(fit_target(truth, heavy + nets, layer_weight=0.02), nets) == pytest.approx(1.0, abs=0.1)
    assert all(single_layer(s.table) for s in heavy) and not any(single_layer(s.table) for s in nets)


def test_a_network_scale_takes_out_the_bias_measured_on_that_network_only():
    """Variants of one network measured 8 % slower than predicted give it a scale of 1.08; another network's
    predictions, a network with too few variants and a hand-made table keep a factor of 1."""
    local = get_target("local")
    slow = [table_of(nn.Sequential(nn.Conv2d(16, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 16, 1)), (1, 16, 28, 28))
            for c in (16, 24, 32, 40, 48)]
    for t in slow:  # variants of one network (pruned widths) keep its uncompressed fingerprint
        t.network = "net-a"
    other = table_of(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)), (1, 8, 14, 14))
    few = [table_of(nn.Sequential(nn.Conv2d(8, 8, 1)), (1, 8, 14, 14)) for _ in range(3)]
    samples = ([Sample(f"a{i}", t, 1.08 * predict(t, local).latency_ms) for i, t in enumerate(slow)]
               + [Sample(f"f{i}", t, 2.0 * predict(t, local).latency_ms) for i, t in enumerate(few)])
    scales = network_scales(local, samples)
    assert scales == {"net-a": pytest.approx(1.08, abs=1e-3)}
    scaled = local.with_(network_scale=scales)
    for t in slow:
        p, q = predict(t, local), predict(t, scaled)
        assert q.latency_ms == pytest.approx(1.08 * p.latency_ms, rel=1e-3)
        # the layers and parts carry the scale too: they still add up to the total
        assert sum(l.latency_ms for l in q.layers) + scaled.call_overhead_us * 1.08e-3 == pytest.approx(q.latency_ms)
        assert sum(q.parts.values()) == pytest.approx(1.08 * sum(p.parts.values()), rel=1e-3)
    assert predict(other, scaled).latency_ms == predict(other, local).latency_ms
    assert network_scales(local, [Sample("x", t, 3.0 * predict(t, local).latency_ms) for t in slow]) == {"net-a": 1.5}
    assert Target.from_json(scaled.to_json()) == scaled
    with pytest.raises(UserInputError, match="network_scale"):
        local.with_(network_scale={"net-a": -1.0})


def test_llc_choices_are_powers_of_two_above_the_cache():
    choices = llc_choices(get_target("local"))
    assert choices and all(c > get_target("local").cache_bytes for c in choices)
    assert all(b == 2 * a for a, b in zip(choices, choices[1:]))


# ---- calibration from measured numbers ---------------------------------------------------------------

def test_calibrate_from_csv_recovers_a_known_device(tmp_path):
    truth = get_target("mobile").with_(
        efficiency={"conv": 0.6, "pointwise": 0.5, "depthwise": 0.2, "grouped": 0.3, "linear": 0.4},
        kernel_overhead_us=25.0, dram_gbs=7.0)
    rows = ["op,in_ch,out_ch,kernel,stride,groups,hw,latency_ms"]
    configs = [("conv", c, c, 3, s, 1, hw) for c, hw in ((16, 112), (32, 56), (64, 28), (128, 14), (256, 7)) for s in (1, 2)]
    configs += [("conv", c, 2 * c, 1, 1, 1, hw) for c, hw in ((16, 112), (32, 56), (64, 28), (128, 14), (256, 7))]
    configs += [("dwconv", c, c, 3, s, c, hw) for c, hw in ((64, 112), (128, 56), (256, 28), (512, 14)) for s in (1, 2)]
    configs += [("linear", 1024, 1000, 1, 1, 1, 1), ("linear", 256, 10, 1, 1, 1, 1), ("add", 64, 64, 1, 1, 1, 56),
                ("pool", 64, 64, 1, 2, 1, 112), ("concat", 32, 64, 1, 1, 1, 28)]
    header = rows[0].split(",")
    lines = [rows[0]]
    for cfg in configs:
        row = dict(zip(header, map(str, cfg)))
        table, batch = layer_table(row, "test")
        lines.append(",".join(map(str, cfg)) + f",{predict(table, truth, batch).latency_ms:.6f}")
    csv_path = tmp_path / "measured.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    fitted, path = calibrate_from_csv(csv_path, name="mynpu", base="mobile")
    assert path.is_file() and "mynpu" in target_names()
    assert get_target("mynpu") == fitted and fitted.calibrated is True
    assert fitted.fit["within_5"] >= 0.9
    for s in read_csv_samples(csv_path):
        assert predict(s.table, "mynpu").latency_ms == pytest.approx(s.measured_ms, rel=0.1)
    assert fitted.efficiency["depthwise"] == pytest.approx(0.2, rel=0.25)
    assert fitted.kernel_overhead_us == pytest.approx(25.0, rel=0.25)
    assert fitted.fit["plan"] == "csv" and fitted.fit["measured_by"] == "measured.csv" and fitted.fit["fitted_at"]
    row = next(r for r in json.loads(CliRunner().invoke(app, ["targets", "--json"]).output) if r["name"] == "mynpu")
    assert row["fitted_at"] == fitted.fit["fitted_at"] and row["held_out"] is None  # no held-out check from a CSV


@pytest.mark.parametrize("content, match", [
    ("op,in_ch\nconv,3\n", "missing columns"),
    ("op,in_ch,out_ch,kernel,stride,groups,hw,latency_ms\nmatmul,3,3,1,1,1,8,1.0\n", "not one of"),
    ("op,in_ch,out_ch,kernel,stride,groups,hw,latency_ms\nconv,3,8,3,1,1,8,fast\n", "not a number"),
])
def test_bad_csv_is_a_user_error(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(UserInputError, match=match):
        calibrate_from_csv(p, name="bad", base="mobile")


def test_fit_needs_enough_samples():
    with pytest.raises(UserInputError, match="at least 4"):
        fit_target(get_target("mobile"), [])


# ---- CLI ------------------------------------------------------------------------------------------

def test_targets_json_lists_the_five_names():
    result = CliRunner().invoke(app, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    names = [d["name"] for d in data]
    assert set(BUILTIN) <= set(names)
    assert all(d["description"] for d in data)
    local = next(d for d in data if d["name"] == "local")
    assert local["threads"] == 1 and local["calibrated"] is False
    assert math.isclose(next(d for d in data if d["name"] == "rpi4")["dram_gbs"], 5.5)


def test_targets_table_and_bad_calibrate_target():
    runner = CliRunner()
    table = runner.invoke(app, ["targets"])
    assert table.exit_code == 0 and "x86-server" in table.output
    bad = runner.invoke(app, ["calibrate", "--target", "mynpu"])
    assert bad.exit_code == 2
    assert "--from-csv" in bad.output and len(bad.output.strip().splitlines()) == 1
    for args, says in ((["--model", "nosuch:net"], "nosuch"), (["--model", "builtin:digits-net", "--variants", "0"], "--variants"),
                       (["--from-csv", "x.csv", "--target", "mynpu", "--model", "builtin:digits-net"], "--model")):
        bad = runner.invoke(app, ["calibrate", *args])
        assert bad.exit_code == 2 and says in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output


@pytest.mark.heavy
def test_calibrate_local_quick_end_to_end():
    """`autocompress calibrate --target local --quick` measures, profiles, fits and saves `local`."""
    from autocompress.api import open_model

    result = CliRunner().invoke(app, ["calibrate", "--target", "local", "--quick", "--json",
                                      "--model", "builtin:digits-net", "--variants", "4"])
    assert result.exit_code == 0, result.output
    fitted = Target.from_json(json.loads(result.output))
    assert fitted.calibrated is True and get_target("local") == fitted
    assert fitted.fit["samples"] >= 20 + 4
    # the searched network's own bias, keyed as a search on it looks it up
    assert list(fitted.network_scale) == [open_model("builtin:digits-net").space.fingerprint]
    assert 0.67 <= fitted.network_scale[open_model("builtin:digits-net").space.fingerprint] <= 1.5
    assert fitted.fit["network_scale_by_model"] == {"builtin:digits-net": next(iter(fitted.network_scale.values()))}
    assert "builtin:digits-net" in fitted.description and "builtin:digits-net" in fitted.sources["fitted"]
    # every fitted coefficient is positive and finite, and the fit explains its own data
    for name in ("dram_gbs", "cache_gbs", "kernel_overhead_us", "elementwise_overhead_us", "int8_out_ns"):
        assert 0 < getattr(fitted, name) < 1e6, name
    assert all(0 < v <= 3 for v in fitted.efficiency.values())
    assert fitted.fit["median_abs_err"] < 0.25
    assert "fitted" in fitted.sources
    # it checked itself on variants it was not fitted to: two more of each of the quick plan's two networks
    held = fitted.fit["held_out"]
    assert held["samples"] == 4 and 0 <= held["within_10"] <= 1 and held["max_abs_err"] >= held["median_abs_err"]
    assert fitted.fit["plan"] == "quick" and fitted.fit["fitted_at"].endswith("UTC")


def test_the_fit_computes_what_predict_computes():
    """The fit evaluates latencies over all of a sample's kernels at once (calibrate.FitProblem); for random compressed
    variants (int8 and float parts, pools, concats, plain kernels, reorders) it must give `predict`'s
    totals and parts, so a fitted coefficient means in `predict` what it meant in the fit."""
    import random

    from autocompress.compress import estimate
    from autocompress.hwmodels.calibrate import FitProblem, random_policy
    from autocompress.hwmodels.predict import PARTS
    from autocompress.compress import build_space

    samples = []
    for spec, shape in (("builtin:digits-net", None), ("torchvision:mobilenet_v2", (1, 3, 96, 96)),
                        ("torchvision:googlenet", (1, 3, 96, 96))):
        lm = load_model(spec)
        space = build_space(trace(lm.model, shape or lm.input_shape), spec)
        rng = random.Random(spec)
        samples += [Sample(f"{spec} {v}", estimate(space, random_policy(space, rng)), 1.0) for v in range(4)]
    for target in (get_target("local"), get_target("mobile")):
        prob = FitProblem(target, samples)
        x = prob.x0()
        at = prob.target(x)  # the target the fit evaluates (zero coefficients start at 1e-3)
        total_us, parts = prob.predicted_parts(x)
        for s, us, row in zip(samples, total_us, parts):
            p = predict(s.table, at)
            assert us / 1e3 == pytest.approx(p.latency_ms, rel=1e-6), (target.name, s.name)
            assert list(row / 1e3) == pytest.approx([p.parts[k] for k in PARTS], rel=1e-6, abs=1e-9)


def test_the_fit_computes_what_predict_computes_for_sequence_models():
    """Attention, RNN steps, bias passes and gathers go through the fit's arrays exactly as through predict,
    and the designed set's sequence models make the fit see the RNN step overhead."""
    from autocompress.hwmodels.calibrate import FitProblem
    from autocompress.hwmodels.calibrate._sequence_nets import sequence_configs
    from autocompress.hwmodels.predict import PARTS
    from autocompress.space.inputs import Inputs

    samples = []
    for name, make, inputs in sequence_configs(quick=False):
        assert isinstance(inputs, Inputs)
        samples.append(Sample(name, CostTable.from_graph(trace(make(), inputs=inputs)), 1.0))
    assert {"attention", "rnn", "norm", "conv"} <= {r.op for s in samples for r in s.table}
    for target in (get_target("local"), get_target("gpu")):
        prob = FitProblem(target, samples)
        assert "step_overhead_us" in prob.names and "math_ns" in prob.names
        x = prob.x0()
        total_us, parts = prob.predicted_parts(x)
        for s, us, row in zip(samples, total_us, parts):
            p = predict(s.table, prob.target(x))
            assert us / 1e3 == pytest.approx(p.latency_ms, rel=1e-6), (target.name, s.name)
            assert list(row / 1e3) == pytest.approx([p.parts[k] for k in PARTS], rel=1e-6, abs=1e-9)


def test_transcendental_work_costs_math_ns_per_element_and_a_relu_net_none():
    """An encoder layer's GELU, two layer norms and attention's softmax scores each pay ``math_ns`` per
    element on top of their traffic (a CPU spends a tenth of a transformer's time there); ReLU and add do not."""
    from autocompress.hwmodels.calibrate._sequence_nets import encoder

    d, heads, ffn, tokens = 64, 4, 256, 32
    make, inputs = encoder(d, heads, ffn, tokens)
    table = CostTable.from_graph(trace(make(), inputs=inputs))
    base = get_target("local").with_(math_ns=0.0)
    extra_ms = predict(table, base.with_(math_ns=2.0)).latency_ms - predict(table, base).latency_ms
    elements = ffn * tokens + 2 * d * tokens + heads * tokens * tokens
    assert extra_ms == pytest.approx(2.0 * elements / 1e6, rel=1e-9)
    cnn = CostTable.from_graph(trace(load_model("builtin:digits-net").model, (1, 1, 32, 32)))
    assert predict(cnn, base.with_(math_ns=2.0)).latency_ms == pytest.approx(predict(cnn, base).latency_ms, rel=1e-12)


class _Relu6(nn.Module):
    def forward(self, x):
        return nn.functional.relu6(x)


@pytest.mark.parametrize("act", [nn.ReLU6, _Relu6])
def test_a_clip_after_an_int8_conv_fuses_only_into_int8_readers(act):
    """ONNX Runtime folds a ReLU (Relu) into QLinearConv but a ReLU6 (Clip) only when int8 kernels read
    it: for a float reader it dequantises the conv's output and clips in float, a pass of its own
    (QLinearConv, DequantizeLinear, Clip, profiled); between int8 convs it adds a requantising DQ+Q pair."""
    local = get_target("local")

    def run(activation: type[nn.Module], tail_bits: int):
        base = table_of(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), activation(), nn.Conv2d(32, 32, 1)),
                        (1, 16, 28, 28))
        first, tail = _conv_names(base)
        return structure(_set_bits(base, {first: 8, tail: tail_bits}), local)

    relu, clip = run(nn.ReLU, 32), run(act, 32)
    assert [o.name for o in relu.ops if o.bytes_moved > 0] == []  # the ReLU fused into the int8 conv
    standalone = [o for o in clip.ops if o.bytes_moved > 0]
    assert len(standalone) == 1 and standalone[0].output_elements == 32 * 28 * 28  # the Clip runs alone, in float
    assert standalone[0].conversions == 1  # it carries the DequantizeLinear of the conv's output
    relu8, clip8 = run(nn.ReLU, 8), run(act, 8)
    assert [o for o in clip8.ops if o.bytes_moved > 0] == []  # between int8 convs the Clip folds ...
    assert clip8.kernels[0].conversions == relu8.kernels[0].conversions + 2  # ... at the cost of a DQ and a Q
