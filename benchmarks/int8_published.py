"""Published int8-vs-float speed-ups, one record per (source, device, model), read from the cited page.

Each record names the fixed target whose device class it speaks for and the model of
``benchmarks/int8_ratios.py`` it is compared with. A network stands for the op classes that hold
most of its MACs (``proxy_for``): ResNet-18 and VGG-16 for dense 3x3 convs (99 %); ResNet-50,
GoogLeNet and SqueezeNet for dense plus 1x1 convs; MobileNet V1/V2 for pointwise (89-95 %) plus
depthwise convs; MobileNetV3 for hard-swish/SE blocks; BERT for linear layers. No source found gives
the speed-up of a single depthwise or pointwise layer on these devices, so those classes are
checked through the MobileNets only.
"""

from __future__ import annotations

from dataclasses import dataclass

TF_MODELS = ("tensorflow/models research/slim/nets/mobilenet/README.md, 'Mobilenet V3 Imagenet Checkpoints' "
             "(TFLite, one large core)")
TFLITE_HOSTED = ("tensorflow/tensorflow tensorflow/lite/g3doc/guide/hosted_models.md "
                 "(Pixel 3, Android 10, TFLite CPU, 4 threads)")
TFLITE_BENCH = ("tensorflow/tensorflow tensorflow/lite/g3doc/performance/benchmarks.md "
                "(Android 10, TFLite CPU, 4 threads)")
NCNN = "Tencent/ncnn benchmark/README.md"
NCNN_855 = (f"{NCNN} at a4d2ea1d, 'Qualcomm SM8150-AC Snapdragon 855+', benchncnn 8 1 2 -1 1 "
            "(one big core; section of 2020-06)")
NCNN_9300 = (f"{NCNN} at a4d2ea1d, 'MediaTek Dimensity 9300', benchncnn 8 1 2 -1 1 "
             "(one big core; section of 2024-01)")
NCNN_PI_2020 = f"{NCNN} at 97b43944e (2020-05-13), 'Raspberry Pi 4 Model B ... (1.5GHz x 4)', benchncnn 8 4 0"
NCNN_PI_2022 = f"{NCNN} at 71f377e9e (2022-01-17), 'Raspberry Pi 4 Model B ... (1.5GHz x 4)', benchncnn 8 4 0"
NCNN_PI_2023 = (f"{NCNN} at cc37c1099 (2023-06-15, current), 'Raspberry Pi 4 Model B ... (1.8GHz x 4)', "
                "benchncnn 10 4 0 -1 1")
XNNPACK_PI = ("google/XNNPACK README.md 'Raspberry Pi' table (benchmarked Feb 8, 2022, end2end-bench, multi-threaded, "
              "INT8 per-channel), column 'RPi 4 (BCM2711, ARM64)'")
XNNPACK_PI_V7 = XNNPACK_PI.replace("'RPi 4 (BCM2711, ARM64)'", "'RPi 4 (BCM2711)' (32-bit Raspbian)")
PYTORCH_BLOG = ("PyTorch blog 'Introduction to Quantization on PyTorch' (Krishnamoorthi et al., 2020), 'Performance "
                "Results' table (Xeon-D2191 1.6 GHz, single thread, FBGEMM)")
OPENVINO = ("OpenVINO 2021.4 docs 'INT8 vs FP32 Comparison on Select Networks and Platforms' "
            "(docs.openvino.ai/2021.4/openvino_docs_performance_int8_vs_fp32.html), throughput speed-up, "
            "column 'Intel Xeon Platinum 8270' (Cascade Lake, AVX-512 VNNI, all cores)")
NCNN_XEON = (f"{NCNN} at a4d2ea1d, 'Microsoft Azure Standard D64s v6 Instance' (Intel Xeon Platinum 8573C, "
             "ncnn 20260113), 'Results (With AVX512)', benchncnn 512 1 0 -1 0 (one thread)")
MODELOPT_ISSUE = ("NVIDIA/Model-Optimizer issue #3, maintainer comment of 2024-05-25: on an A100 'the int8 * int8 Gemm "
                  "and Conv operations are 1.9 times faster than those in fp16' (TensorRT)")
EMBEDL = ("docs.embedl.com/embedl-deploy/latest/guide/benchmarks.html, ResNet50 (NVIDIA L4, TensorRT 10.9, trtexec "
          "--useCudaGraph, batch 1): Baseline FP16 0.267 ms, ModelOpt INT8 0.222 ms")
YESTER = ("yester31/quantization_ex README (RTX 3060 laptop, TensorRT 8.6.1, ResNet18, input 1x3x224x224): "
          "TRT FP32 1.188 ms, TRT FP16 0.527 ms, TRT PTQ Int8 0.418 ms")


@dataclass(frozen=True)
class PublishedRatio:
    """One published int8 speed-up over fp32 (or fp16, ``baseline``) and what it is compared with."""

    target: str  # the fixed target whose device class it speaks for
    compare_with: str  # a model of benchmarks/int8_ratios.py (network spec or op-model name)
    published_model: str  # the model as the source names it
    proxy_for: str  # the op class (or classes) it stands for
    device: str
    source: str
    base_ms: float | None = None  # float latency as published (ms)
    int8_ms: float | None = None
    speedup: float | None = None  # where the source states the ratio itself (e.g. a throughput speed-up)
    baseline: str = "fp32"  # "fp32" or "fp16"
    batch: int = 1  # the batch our prediction is taken at
    part: str = ""  # an op class summed inside the compared network (kernel-level figures); "": the whole model

    @property
    def ratio(self) -> float:
        return self.speedup if self.speedup is not None else self.base_ms / self.int8_ms


_PIXEL3 = "Pixel 3 (Snapdragon 845), one large core"
_PI = "Raspberry Pi 4 (Cortex-A72 x 4), 4 threads"
_XEON_D = "Xeon-D2191 (AVX-512, no VNNI), 1 thread"
_XEON_8270 = "Xeon Platinum 8270, all cores"

PUBLISHED_RATIOS: tuple[PublishedRatio, ...] = (
    # mobile: phone big cores, TFLite (the runtime the target's fp32 numbers come from), and ncnn
    PublishedRatio("mobile", "torchvision:mobilenet_v3_large", "MobileNetV3-Large dm=1", "hswish_se_block", _PIXEL3,
                   TF_MODELS, 44.0, 32.0),
    PublishedRatio("mobile", "torchvision:mobilenet_v3_small", "MobileNetV3-Small dm=1", "hswish_se_block", _PIXEL3,
                   TF_MODELS, 14.4, 10.7),
    PublishedRatio("mobile", "torchvision:mobilenet_v3_large", "MobileNetV3-Large dm=1", "hswish_se_block",
                   "Pixel 2 (Snapdragon 835), one large core", TF_MODELS, 61.0, 42.5),
    PublishedRatio("mobile", "mobilenet_v1", "Mobilenet_V1_1.0_224", "pointwise+depthwise", "Pixel 3, 4 threads",
                   TFLITE_HOSTED, 24.0, 13.0),
    PublishedRatio("mobile", "torchvision:mobilenet_v2", "Mobilenet_V2_1.0_224", "pointwise+depthwise",
                   "Pixel 3, 4 threads", TFLITE_HOSTED, 17.5, 12.0),
    PublishedRatio("mobile", "mobilenet_v1", "Mobilenet_1.0_224", "pointwise+depthwise",
                   "Pixel 4 (Snapdragon 855), 4 threads", TFLITE_BENCH, 14.0, 5.0),
    PublishedRatio("mobile", "mobilenet_v1", "mobilenet", "pointwise+depthwise",
                   "Snapdragon 855+ (Kryo 485), one big core", NCNN_855, 14.45, 11.17),
    PublishedRatio("mobile", "torchvision:resnet18", "resnet18", "conv", "Snapdragon 855+ (Kryo 485), one big core",
                   NCNN_855, 22.12, 26.22),
    PublishedRatio("mobile", "mobilenet_v1", "mobilenet", "pointwise+depthwise",
                   "Dimensity 9300 (Cortex-X4), one big core", NCNN_9300, 9.74, 4.37),
    PublishedRatio("mobile", "torchvision:resnet18", "resnet18", "conv", "Dimensity 9300 (Cortex-X4), one big core",
                   NCNN_9300, 18.53, 9.99),
    # rpi4: ncnn on the same board (the target's fp32 source), three README versions, and XNNPACK
    PublishedRatio("rpi4", "mobilenet_v1", "mobilenet", "pointwise+depthwise", _PI, NCNN_PI_2020, 86.01, 168.48),
    PublishedRatio("rpi4", "torchvision:resnet18", "resnet18", "conv", _PI, NCNN_PI_2020, 233.89, 159.56),
    PublishedRatio("rpi4", "mobilenet_v1", "mobilenet", "pointwise+depthwise", _PI, NCNN_PI_2022, 72.08, 40.30),
    PublishedRatio("rpi4", "torchvision:resnet18", "resnet18", "conv", _PI, NCNN_PI_2022, 176.18, 97.99),
    PublishedRatio("rpi4", "torchvision:resnet50", "resnet50", "conv+pointwise", _PI, NCNN_PI_2022, 335.34, 236.38),
    PublishedRatio("rpi4", "torchvision:googlenet", "googlenet", "conv+pointwise", _PI, NCNN_PI_2022, 143.09, 118.78),
    PublishedRatio("rpi4", "torchvision:squeezenet1_1", "squeezenet", "conv+pointwise", _PI, NCNN_PI_2022,
                   58.93, 49.33),
    PublishedRatio("rpi4", "torchvision:vgg16", "vgg16", "conv", _PI, NCNN_PI_2022, 873.71, 456.76),
    PublishedRatio("rpi4", "mobilenet_v1", "mobilenet", "pointwise+depthwise", _PI + " (1.8 GHz)", NCNN_PI_2023,
                   61.17, 34.37),
    PublishedRatio("rpi4", "torchvision:resnet18", "resnet18", "conv", _PI + " (1.8 GHz)", NCNN_PI_2023,
                   123.12, 83.92),
    PublishedRatio("rpi4", "mobilenet_v1", "FP32/INT8 MobileNet v1 1.0X", "pointwise+depthwise",
                   "Raspberry Pi 4, ARM64", XNNPACK_PI, 77.0, 24.0),
    PublishedRatio("rpi4", "torchvision:mobilenet_v2", "FP32/INT8 MobileNet v2 1.0X", "pointwise+depthwise",
                   "Raspberry Pi 4, ARM64", XNNPACK_PI, 46.0, 17.0),
    PublishedRatio("rpi4", "torchvision:mobilenet_v2", "FP32/INT8 MobileNet v2 1.0X", "pointwise+depthwise",
                   "Raspberry Pi 4, 32-bit", XNNPACK_PI_V7, 41.0, 20.0),
    # x86-server: one server core; FBGEMM (no VNNI), OpenVINO (VNNI, all cores), ncnn (VNNI, one thread)
    PublishedRatio("x86-server", "torchvision:resnet50", "Resnet-50", "conv+pointwise", _XEON_D, PYTORCH_BLOG,
                   214.0, 103.0),
    PublishedRatio("x86-server", "bert_ffn", "BERT (dynamic quantization, seq 128)", "linear", _XEON_D, PYTORCH_BLOG,
                   581.0, 313.0),
    PublishedRatio("x86-server", "torchvision:resnet18", "resnet-18-pytorch", "conv", _XEON_8270, OPENVINO,
                   speedup=4.2),
    PublishedRatio("x86-server", "torchvision:resnet50", "resnet-50-pytorch", "conv+pointwise", _XEON_8270, OPENVINO,
                   speedup=3.9),
    PublishedRatio("x86-server", "torchvision:mobilenet_v2", "mobilenet-v2-pytorch", "pointwise+depthwise", _XEON_8270,
                   OPENVINO, speedup=4.0),
    PublishedRatio("x86-server", "bert_ffn", "bert-large-uncased-whole-word-masking-squad-0001", "linear", _XEON_8270,
                   OPENVINO, speedup=2.5),
    PublishedRatio("x86-server", "mobilenet_v1", "mobilenet", "pointwise+depthwise", "Xeon Platinum 8573C, 1 thread",
                   NCNN_XEON, 7.94, 7.07),
    PublishedRatio("x86-server", "torchvision:resnet18", "resnet18", "conv", "Xeon Platinum 8573C, 1 thread",
                   NCNN_XEON, 14.58, 9.90),
    PublishedRatio("x86-server", "torchvision:resnet50", "resnet50", "conv+pointwise", "Xeon Platinum 8573C, 1 thread",
                   NCNN_XEON, 39.06, 23.52),
    # gpu: NVIDIA tensor-core GPUs with TensorRT; mostly int8 against fp16, the usual GPU baseline
    PublishedRatio("gpu", "torchvision:resnet50", "int8 Conv vs fp16 Conv", "conv", "A100, TensorRT", MODELOPT_ISSUE,
                   speedup=1.9, baseline="fp16", batch=256, part="conv"),
    PublishedRatio("gpu", "bert_ffn", "int8 Gemm vs fp16 Gemm", "linear", "A100, TensorRT", MODELOPT_ISSUE,
                   speedup=1.9, baseline="fp16", batch=256),
    PublishedRatio("gpu", "torchvision:resnet50", "ResNet50", "conv+pointwise", "L4, TensorRT 10.9, batch 1", EMBEDL,
                   0.267, 0.222, baseline="fp16"),
    PublishedRatio("gpu", "torchvision:resnet18", "ResNet18", "conv", "RTX 3060 laptop, TensorRT 8.6, batch 1", YESTER,
                   0.527, 0.418, baseline="fp16"),
    PublishedRatio("gpu", "torchvision:resnet18", "ResNet18", "conv", "RTX 3060 laptop, TensorRT 8.6, batch 1", YESTER,
                   1.188, 0.418),
)
