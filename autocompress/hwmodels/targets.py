"""The target registry: built-in targets (one table each, with sources) and calibrated files.

A calibrated or user-made target lives in ``<cache>/targets/<name>.json``
(``$AUTOCOMPRESS_CACHE`` if set, else ``~/.cache/autocompress``) and takes
precedence over the built-in of the same name, so ``autocompress calibrate
--target local`` changes what ``local`` predicts from then on.
"""

from __future__ import annotations

from pathlib import Path

from autocompress.cache import cache_dir  # noqa: F401  (re-exported)
from autocompress.errors import UnknownNameError
from autocompress.hwmodels.target import Target
from autocompress.registry import Registry

TARGETS: Registry[Target] = Registry("target")

_A75 = "Arm Cortex-A75 Software Optimization Guide / Technical Reference Manual: 2x128-bit NEON FMA pipes (8 fp32 MAC/cycle)"
_DOT = "Armv8.2-A dot product (SDOT): 16 int8 MACs per 128-bit instruction, 2 pipes (32 MAC/cycle)"
_EFF_MOBILE = ("set so that the MobileNetV2 1.0 latency of the MobileNetV3 paper (Howard et al., ICCV 2019, "
               "Table 3, Pixel 3, TFLite, one large core, float; approximately 56 ms) is reproduced; "
               "depthwise at about a third of dense efficiency as in nn-Meter's kernel measurements")
# Published int8 speed-ups each target is checked against (benchmarks/int8_published.py holds every figure).
_INT8_MOBILE = ("tensorflow/models slim/nets/mobilenet README (TFLite, one large core): MobileNetV3-Large 44 vs 32 ms and "
                "-Small 14.4 vs 10.7 ms on a Pixel 3; TFLite hosted models (Pixel 3, 4 threads): Mobilenet_V1_1.0_224 "
                "24.0 vs 13 ms, Mobilenet_V2_1.0_224 17.5 vs 12 ms; TFLite benchmarks page (Pixel 4, 4 threads): "
                "Mobilenet_1.0_224 14.0 vs 5.0 ms")
_INT8_RPI4 = ("Tencent/ncnn benchmark/README.md, Raspberry Pi 4, 4 threads: 2022-01 table (1.5 GHz) mobilenet 72.08 vs "
              "40.30 ms, resnet18 176.18 vs 97.99 ms, googlenet 143.09 vs 118.78 ms; 2023-06 table (1.8 GHz) mobilenet "
              "61.17 vs 34.37 ms, resnet18 123.12 vs 83.92 ms; google/XNNPACK README (Feb 2022, RPi 4): MobileNet v2 "
              "41 vs 20 ms (32-bit), 46 vs 17 ms (ARM64)")
_INT8_X86 = ("PyTorch blog 'Introduction to Quantization on PyTorch' (Xeon-D2191, 1 thread, FBGEMM): Resnet-50 214 vs "
             "103 ms, BERT 581 vs 313 ms; OpenVINO 2021.4 int8-vs-fp32 page (Xeon Platinum 8270, throughput): "
             "resnet-18 4.2x, resnet-50 3.9x, mobilenet-v2 4.0x, bert-large 2.5x; Tencent/ncnn benchmark/README.md "
             "(Xeon Platinum 8573C, AVX-512, 1 thread): mobilenet 7.94 vs 7.07 ms, resnet18 14.58 vs 9.90 ms")
_INT8_GPU = ("NVIDIA/Model-Optimizer issue #3 (maintainer, A100): int8 Gemm and Conv 1.9x fp16; Embedl Deploy "
             "benchmarks (L4, TensorRT 10.9, batch 1): ResNet50 0.267 vs 0.222 ms")

TARGETS.register("mobile", Target(
    name="mobile",
    description="one big core of a Pixel 3/4-class phone (Cortex-A75/A76, ~2.5 GHz), single thread, TFLite-class runtime",
    peak_gmacs={"fp32": 20.0, "fp16": 40.0, "int8": 80.0},
    efficiency={"conv": 0.4, "pointwise": 0.33, "depthwise": 0.12, "grouped": 0.22, "linear": 0.3},
    dram_gbs=10.0, cache_gbs=40.0, cache_bytes=1 << 20,
    kernel_overhead_us=10.0, elementwise_overhead_us=5.0, call_overhead_us=50.0,
    prune_round_to=4,
    channel_block=4, fast_int8=True, fast_fp16=True, threads=1, int8_efficiency=0.48, step_overhead_us=1.0,
    sources={
        "prune_round_to": "channel_block: a pruned width between multiples of the 4-lane NEON block costs as the next multiple (padded); rounded so pruning always buys speed",
        "peak_gmacs.fp32": f"2.5 GHz x 8 MAC/cycle; {_A75}; Pixel 3 big-core clock 2.5 GHz (Snapdragon 845 spec)",
        "peak_gmacs.fp16": "Armv8.2-A half-precision arithmetic: 16 fp16 MAC/cycle x 2.5 GHz",
        "peak_gmacs.int8": f"2.5 GHz x 32 MAC/cycle; {_DOT}",
        "efficiency": _EFF_MOBILE,
        "dram_gbs": "LPDDR4X 4x16-bit at 1866 MHz is ~30 GB/s peak; one core sustains about a third (STREAM-class single-core figure, approximate)",
        "cache_bytes": "Cortex-A75 256-512 KiB private L2 + 2 MiB shared L3 (Snapdragon 845); 1 MiB effective per core, approximate",
        "kernel_overhead_us": "TFLite per-op dispatch on a phone core, ~5-20 us (TFLite benchmark_model op profiles), approximate",
        "int8_efficiency": "set so that int8 MobileNets run ~1.9x faster than fp32 (docs/int8-ratios.md), within a factor 1.5 of "
                           "every published TFLite Pixel ratio: 1.35-1.85x on a Pixel 3, 2.8x on a Pixel 4",
        "int8_speedup": f"published int8 vs fp32: {_INT8_MOBILE}",
        "step_overhead_us": "TFLite's sequence LSTM loops over the steps inside one op (no interpreter dispatch per step); about twice the ~0.4 us per step ONNX Runtime's in-op loop takes on an x86 core (see local), approximate",
    },
))

TARGETS.register("rpi4", Target(
    name="rpi4",
    description="Raspberry Pi 4 Model B (4x Cortex-A72 at 1.5 GHz, all four cores), no int8 dot product, ~5.5 GB/s DRAM",
    peak_gmacs={"fp32": 48.0, "fp16": 48.0, "int8": 48.0},
    efficiency={"conv": 0.18, "pointwise": 0.12, "depthwise": 0.04, "grouped": 0.07, "linear": 0.1},
    dram_gbs=5.5, cache_gbs=16.0, cache_bytes=1 << 20,
    kernel_overhead_us=40.0, elementwise_overhead_us=20.0, call_overhead_us=100.0,
    prune_round_to=4,
    channel_block=4, fast_int8=True, fast_fp16=False, threads=4, int8_efficiency=1.6, step_overhead_us=5.0,
    sources={
        "prune_round_to": "channel_block: a pruned width between multiples of the 4-lane NEON block costs as the next multiple (padded); rounded so pruning always buys speed",
        "peak_gmacs.fp32": "4 cores x 1.5 GHz x 8 fp32 MAC/cycle (Cortex-A72: two 128-bit FP/NEON pipes with FMA; Arm Cortex-A72 Software Optimization Guide)",
        "peak_gmacs.int8": "Armv8.0-A has no SDOT: int8 goes through widening multiplies (SMULL/SMLAL), so its peak is stated as fp32's",
        "int8_efficiency": "int8 kernels run 1.6x the fp32 rate (ncnn's and XNNPACK's widening-multiply kernels, int8 tensors): "
                           "set so the predicted speed-up (~1.6x) is within a factor 1.5 of every ncnn Pi 4 int8 figure "
                           "since 2022 (1.10-1.91x) and of XNNPACK's 32-bit one (2.05x); docs/int8-ratios.md",
        "fast_int8": "int8 runs faster than fp32 on the Pi 4 in every ncnn README table since 2022 and in XNNPACK's "
                     "(the 2020 ncnn table had mobilenet_int8 168 ms vs mobilenet 86 ms; the 2022 one 40.3 vs 72.1 ms)",
        "int8_speedup": f"published int8 vs fp32: {_INT8_RPI4}",
        "peak_gmacs.fp16": "Armv8.0-A has no fp16 arithmetic: fp16 runs as fp32",
        "efficiency": "set from the ncnn benchmark README (Tencent/ncnn benchmark/README.md, 'Raspberry Pi 4 Model B Broadcom BCM2711B0, Cortex-A72 1.5GHz x 4', benchncnn 8 4 0): mobilenet_v2 75.8 ms, resnet18 233.9 ms, googlenet 176.2 ms, shufflenet_v2 33.4 ms",
        "dram_gbs": "LPDDR4-3200 32-bit bus (12.8 GB/s peak); measured copy bandwidth ~5-6 GB/s (commonly reported STREAM/sysbench results), approximate",
        "cache_bytes": "1 MiB shared L2 (BCM2711 datasheet)",
        "kernel_overhead_us": "per-layer thread-pool fork/join on 4 A72 cores, tens of microseconds, approximate",
        "step_overhead_us": "ncnn parallelises each LSTM/GRU step over the hidden units (an OpenMP region per step): one fork/join of 4 A72 cores per step, a few microseconds, approximate",
    },
))

TARGETS.register("x86-server", Target(
    name="x86-server",
    description="one server core with AVX-512 and VNNI (Xeon Cascade Lake/Ice Lake class, ~2.5 GHz AVX-512 clock), single thread",
    peak_gmacs={"fp32": 80.0, "fp16": 80.0, "int8": 320.0},
    efficiency={"conv": 0.36, "pointwise": 0.4, "depthwise": 0.08, "grouped": 0.18, "linear": 0.3},
    dram_gbs=12.0, cache_gbs=80.0, cache_bytes=int(1.25 * (1 << 20)),
    kernel_overhead_us=3.0, elementwise_overhead_us=2.0, call_overhead_us=20.0,
    prune_round_to=16,
    channel_block=16, fast_int8=True, fast_fp16=False, threads=1, int8_efficiency=0.6, step_overhead_us=0.4,
    sources={
        "prune_round_to": "channel_block: AVX-512 kernels (oneDNN's nChw16c) pad channels to 16; rounded so pruning always buys speed",
        "peak_gmacs.fp32": "2 AVX-512 FMA ports x 16 fp32 lanes = 32 MAC/cycle x 2.5 GHz (Intel 64 and IA-32 Optimization Reference Manual)",
        "peak_gmacs.int8": "AVX-512 VNNI VPDPBUSD: 64 int8 MACs per instruction, 2 ports = 128 MAC/cycle x 2.5 GHz",
        "peak_gmacs.fp16": "no fp16 arithmetic before Sapphire Rapids: fp16 runs as fp32",
        "efficiency": "set from single-thread x86 measurements of the ncnn benchmark README (AMD Ryzen Threadripper 3970X, benchncnn 10 1 0: mobilenet_v2 14.8 ms, resnet18 61.4 ms, googlenet 58.5 ms, resnet50 128.2 ms; a Zen 2 core at ~4.3 GHz has 69 GMAC/s fp32 peak, close to this target's 80)",
        "dram_gbs": "single-core sustained DRAM bandwidth of a Xeon server core is ~10-15 GB/s (Intel MLC / STREAM single-thread), approximate",
        "cache_bytes": "1.25 MiB private L2 per core (Ice Lake-SP)",
        "int8_efficiency": "oneDNN/ORT int8 reaches ~2-3x fp32 with VNNI once quantise/dequantise work is counted (Intel VNNI white papers), approximate; "
                           "the predicted ~2.4x lies between the published one-core ratios (1.1-2.1x) and the all-core "
                           "OpenVINO ones (2.5-4.2x): docs/int8-ratios.md",
        "int8_speedup": f"published int8 vs fp32: {_INT8_X86}",
        "step_overhead_us": "ONNX Runtime's LSTM/GRU loop over the steps inside one op, one thread: 0.34 / 0.52 us per step measured for hidden size 8 (ORT 1.32, one x86 core), where the step's MACs take ~0.05 us",
    },
))

TARGETS.register("gpu", Target(
    name="gpu",
    description="an H100 SXM-class GPU (TensorRT-class runtime; fp32 as TF32); pass batch= for throughput",
    peak_gmacs={"fp32": 247_000.0, "fp16": 494_700.0, "int8": 989_500.0},
    efficiency={"conv": 0.45, "pointwise": 0.45, "depthwise": 0.03, "grouped": 0.1, "linear": 0.4},
    dram_gbs=3350.0, cache_gbs=10_000.0, cache_bytes=50 << 20,
    kernel_overhead_us=3.0, elementwise_overhead_us=2.5, call_overhead_us=10.0,
    prune_round_to=8,
    channel_block=32, fast_int8=True, fast_fp16=True, threads=1, fused_attention=True, fuses_gelu=True,
    step_overhead_us=3.0,
    sources={
        "prune_round_to": "NVIDIA Deep Learning Performance Guide: Tensor Core convolutions want channel counts that are multiples of 8 (fp16; int8 16), others are padded or fall back; 8 keeps small networks' widths searchable",
        "peak_gmacs": "NVIDIA H100 Tensor Core GPU datasheet, SXM, dense: TF32 494.7 TFLOPS, FP16 989.4 TFLOPS, INT8 1978.9 TOPS (MAC = 2 ops)",
        "dram_gbs": "H100 SXM HBM3 3.35 TB/s (datasheet); H200 4.8 TB/s",
        "cache_bytes": "50 MB L2 (NVIDIA Hopper architecture whitepaper)",
        "efficiency": "set so that ResNet-50 int8 at a large batch gives the per-GPU MLPerf Inference v3.x datacenter Offline throughput of an H100-SXM (about 80-90k samples/s per GPU, TensorRT; approximate)",
        "kernel_overhead_us": "CUDA kernel launch plus ramp/tail, ~2-5 us per kernel (CUDA C Best Practices Guide; graph launches lower), approximate",
        "int8_speedup": f"published int8 vs fp16 (TensorRT): {_INT8_GPU}",
        "fused_attention": "TensorRT fuses multi-head attention into one kernel (fMHA / flash attention) on Hopper (TensorRT developer guide, 'Multi-Head Attention Fusion')",
        "fuses_gelu": "TensorRT fuses GELU into the preceding GEMM (pointwise fusion; cuBLASLt GELU epilogue)",
        "step_overhead_us": "a recurrent step's GEMM waits for the previous step's: one dependent kernel launch per step (cuDNN RNN without persistent kernels), as kernel_overhead_us, approximate",
    },
))

TARGETS.register("local", Target(
    name="local",
    description="this machine through ONNX Runtime (CPU execution provider); uncalibrated defaults: a search calibrates "
                "it on first use, or run `autocompress calibrate --target local`",
    peak_gmacs={"fp32": 48.0, "fp16": 48.0, "int8": 192.0},
    efficiency={"conv": 0.5, "pointwise": 0.55, "depthwise": 0.15, "grouped": 0.25, "linear": 0.3},
    dram_gbs=12.0, cache_gbs=60.0, cache_bytes=1 << 20, llc_bytes=4 << 20, llc_gbs=30.0,
    kernel_overhead_us=3.0, elementwise_overhead_us=2.0, call_overhead_us=20.0, gemm_k0=8.0, gemm_s0=4.0,
    int8_pool_ns=15.0, block_fallback=True, channel_align=4, plain_pool_ns=1.0, math_ns=1.0,
    plain_efficiency={"conv": 0.7, "pointwise": 0.7, "depthwise": 0.25}, reorder_ns=0.5, view_overhead_us=4.0, convert_ns=0.5,
    int8_fuses_add=False, gemv_from_cache=False, dq_per_reader=True, out_ns=0.1, int8_out_ns=0.5,
    model_weights_level=True, cold_outputs=True, step_overhead_us=0.4, sequence_linear_epilogue=False, memory_overlap=0.3,
    channel_block=16, fast_int8=True, fast_fp16=False, threads=1, int8_efficiency=0.5,
    calibrated=False,
    sources={"all": "generic defaults for a ~3 GHz AVX-512 core, several times off on most machines: never used to "
                    "predict for a user (hwmodels.first_use); `autocompress calibrate --target local` fits them"},
))


def target_dir() -> Path:
    return cache_dir() / "targets"


def target_path(name: str) -> Path:
    return target_dir() / f"{name}.json"


_LOADED: dict[Path, tuple[float, Target]] = {}


def _load_file(path: Path) -> Target:
    mtime = path.stat().st_mtime
    hit = _LOADED.get(path)
    if hit is None or hit[0] != mtime:
        hit = (mtime, Target.load(path))
        _LOADED[path] = hit
    return hit[1]


def user_target_names() -> list[str]:
    d = target_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def target_names() -> list[str]:
    """Built-in names first, then calibrated or user-made ones."""
    return TARGETS.names() + [n for n in user_target_names() if n not in TARGETS]


def get_target(name: str | Target) -> Target:
    """The target ``name``: its calibrated file if there is one, else the built-in."""
    if isinstance(name, Target):
        return name
    path = target_path(name)
    if path.is_file():
        return _load_file(path)
    if name in TARGETS:
        return TARGETS.get(name)
    raise UnknownNameError(f"unknown target {name!r}; valid: {', '.join(sorted(target_names()))}")
