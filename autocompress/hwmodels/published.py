"""Published latencies the built-in targets are checked against (tests and docs read this table).

Figures marked approximate are quoted from memory of the cited table and may be
off by a few per cent; the check tolerance (``TOLERANCE``) is much wider.
"""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE = 0.35  # |predicted / published - 1| allowed

_NCNN = "Tencent/ncnn benchmark/README.md (benchncnn)"


@dataclass(frozen=True)
class Published:
    target: str
    model: str  # a model spec (torchvision weights are never needed: latency only)
    latency_ms: float  # for one call at ``batch``
    source: str
    batch: int = 1
    bits: int = 32  # conv/linear weight and activation bits of the run
    approximate: bool = False


def _ips(images_per_s: float, batch: int) -> float:
    return 1e3 * batch / images_per_s


PUBLISHED: tuple[Published, ...] = (
    Published("mobile", "torchvision:mobilenet_v2", 56.0,
              "Howard et al., Searching for MobileNetV3, ICCV 2019, Table 3: MobileNetV2 1.0, Pixel 3, TFLite, "
              "one large core, float", approximate=True),
    Published("mobile", "torchvision:mobilenet_v3_large", 44.0,
              "Howard et al., Searching for MobileNetV3, ICCV 2019, Table 3: MobileNetV3-Large 1.0, Pixel 3, "
              "TFLite, one large core, float", approximate=True),
    Published("rpi4", "torchvision:mobilenet_v2", 75.84, f"{_NCNN}, Raspberry Pi 4 Model B, Cortex-A72 1.5GHz x 4, 4 threads"),
    Published("rpi4", "torchvision:resnet18", 233.89, f"{_NCNN}, Raspberry Pi 4 Model B, Cortex-A72 1.5GHz x 4, 4 threads"),
    Published("rpi4", "torchvision:googlenet", 176.24, f"{_NCNN}, Raspberry Pi 4 Model B, Cortex-A72 1.5GHz x 4, 4 threads"),
    Published("rpi4", "torchvision:shufflenet_v2_x1_0", 33.38, f"{_NCNN}, Raspberry Pi 4 Model B, Cortex-A72 1.5GHz x 4, 4 threads"),
    Published("rpi4", "torchvision:squeezenet1_1", 58.73, f"{_NCNN}, Raspberry Pi 4 Model B, Cortex-A72 1.5GHz x 4, 4 threads"),
    Published("x86-server", "torchvision:mobilenet_v2", 14.82, f"{_NCNN}, AMD Ryzen Threadripper 3970X, 1 thread"),
    Published("x86-server", "torchvision:resnet18", 61.40, f"{_NCNN}, AMD Ryzen Threadripper 3970X, 1 thread"),
    Published("x86-server", "torchvision:googlenet", 58.49, f"{_NCNN}, AMD Ryzen Threadripper 3970X, 1 thread"),
    Published("x86-server", "torchvision:resnet50", 128.21, f"{_NCNN}, AMD Ryzen Threadripper 3970X, 1 thread"),
    Published("gpu", "torchvision:resnet50", _ips(85_000, 2048),
              "MLPerf Inference v3.x datacenter, closed, ResNet-50 Offline, H100-SXM-80GB, TensorRT int8: "
              "about 80-90k samples/s per GPU (85k used; batch 2048 assumed)", batch=2048, bits=8, approximate=True),
)
