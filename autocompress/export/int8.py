"""Deployable int8 ONNX: ONNX Runtime static quantisation of the layers chosen at 8 bits or fewer.

``export_int8`` writes the fp32 ONNX (``export_onnx``, whose node names carry
module paths such as ``/layer1/layer1.0/conv1/Conv``), then runs
``onnxruntime.quantization.quantize_static`` in QDQ format: per-channel
symmetric int8 weights, per-tensor affine uint8 activations calibrated with
min/max over the calibration batches (the same scheme the fake-quant layers
simulate). Layers with ``wbits > 8`` or ``abits > 8`` are excluded and stay
float. 4-bit weights become int4 QDQ (opset 21) where this ONNX Runtime can
run them and ``int4=True`` asks for it, else int8. The :class:`Int8Report` reads the realised bits back from
the written artifact, so it says exactly which requests are only simulated.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.export.onnx import export_onnx
from autocompress.space.inputs import as_tuple

FLOAT = 32
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Where linears run over sequences (MatMul by a weight), int8 linears write float as simulated (ORT's MatMulInteger-
# ToFloat, QGemm): bias adds, GELU, attention and logits stay float. Conv nets keep int8 between layers.
_FLOAT_OUTPUT_LAYERS = ("Gemm", "MatMul")
_FLOAT_OPS = ("LayerNormalization", "Softmax", "Erf", "Gelu")  # too lossy at 8 bits, whatever their inputs
_INT_BITS = {2: 8, 3: 8, 21: 16, 4: 16, 22: 4, 23: 4}  # ONNX TensorProto dtypes: (U)INT8, (U)INT16, (U)INT4


@dataclass(frozen=True)
class LayerInt8:
    """One conv/linear layer: requested (wbits, abits), realised bits in the artifact, ONNX node."""

    path: str
    node: str | None
    requested: tuple[int, int]
    realised: tuple[int, int]

    @property
    def simulated_only(self) -> bool:
        """True when the artifact stores this layer at other bits than requested."""
        return self.requested != self.realised

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.path, "onnx_node": self.node, "requested": {"wbits": self.requested[0],
                "abits": self.requested[1]}, "realised": {"wbits": self.realised[0], "abits": self.realised[1]},
                "simulated_only": self.simulated_only}


@dataclass(frozen=True)
class Int8Report:
    path: Path
    fp32_path: Path
    layers: tuple[LayerInt8, ...]
    int4_supported: bool
    excluded_nodes: tuple[str, ...]
    reduce_range: bool = False  # weights quantised to 7 bits (see ``u8s8_saturates``)

    @property
    def simulated_only(self) -> list[str]:
        return [l.path for l in self.layers if l.simulated_only]

    @property
    def quantised(self) -> list[str]:
        return [l.path for l in self.layers if l.realised[0] < FLOAT]

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "fp32_path": str(self.fp32_path), "int4_supported": self.int4_supported,
                "reduce_range": self.reduce_range, "excluded_nodes": list(self.excluded_nodes),
                "layers": [l.to_json() for l in self.layers]}


def u8s8_saturates(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels on this CPU can saturate.

    On x86-64 without VNNI (AVX2, or AVX-512 before VNNI) ONNX Runtime multiplies
    uint8 activations by int8 weights with ``vpmaddubsw``, which adds each pair of
    products into a saturating int16: two large products overflow it. Weights at 7
    bits (``reduce_range``) keep every pair in range, as ONNX Runtime's quantisation
    guide advises for these CPUs. VNNI (``vpdpbusd``) and Arm's dot-product
    instructions accumulate in int32 and do not saturate.
    """
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True  # unknown x86 CPU: 7-bit weights are safe everywhere
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def module_path_of_node(name: str) -> str | None:
    """Best-effort module path from an exported node name, by joining its scopes.

    ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``: a scope that extends
    the previous one (``layer1`` -> ``layer1.0``) replaces it, any other is a child.
    """
    scopes = [p for p in name.split("/") if p][:-1]
    if not scopes:
        return None
    path, prev = scopes[0], scopes[0]
    for s in scopes[1:]:
        path = path + s[len(prev):] if s.startswith(prev + ".") else f"{path}.{s}"
        prev = s
    return path


def call_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Module paths of the conv/linear layers in the order one forward pass calls them."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(*as_tuple(example_input))
    finally:
        for h in hooks:
            h.remove()
    return order


def _matches(path: str, node_name: str) -> bool:
    """Whether the node's innermost scope names ``path`` (the exporter may add ``_1`` to repeated scopes)."""
    last = [p for p in node_name.split("/") if p][-2:-1]
    if not last:
        return False
    names = {last[0], re.sub(r"_\d+$", "", last[0])}
    return any(path == n or path.endswith("." + n) for n in names)


def is_layer_node(node: Any, initializers: set[str]) -> bool:
    """A conv or linear layer: Conv, Gemm, or a MatMul by a weight (not attention's activation x activation)."""
    return node.op_type in _LAYER_OPS and (node.op_type != "MatMul" or node.input[1] in initializers)


def layer_nodes(model_proto: Any, order: list[str] | None = None) -> dict[str, Any]:
    """Module path -> the conv/linear ONNX node exported for it (first call of a shared module).

    With the layers' call ``order`` the n-th conv/linear node is the n-th call:
    an exporter that drops the parent scopes (as it does for torch.fx
    GraphModules, ``/branch1.0/Conv``) cannot make two layers collide. Without
    it, or when the counts disagree, paths are read from the node names.
    """
    inits = {t.name for t in model_proto.graph.initializer}
    nodes = [n for n in model_proto.graph.node if is_layer_node(n, inits)]
    out: dict[str, Any] = {}
    if order is not None and len(order) == len(nodes) and all(_matches(p, n.name) for p, n in zip(order, nodes)):
        for path, node in zip(order, nodes):
            out.setdefault(path, node)
        return out
    for node in nodes:
        path = module_path_of_node(node.name)
        if path is not None:
            out.setdefault(path, node)
    return out


def fold_identities(model_proto: Any) -> Any:
    """Drop Identity nodes that only forward an initializer, so biases are initializers again.

    The exporter's constant folding leaves some shared constants behind
    Identity nodes; the quantiser only turns initializer biases into int32.
    """
    inits = {t.name for t in model_proto.graph.initializer}
    outputs = {o.name for o in model_proto.graph.output}
    rename = {}
    keep = []
    for node in model_proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not rename:
        return model_proto
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model_proto.graph.node[:]
    model_proto.graph.node.extend(keep)
    return model_proto


def unshare_initializers(model_proto: Any) -> Any:
    """Give every conv/linear node its own weight and bias initializers.

    The exporter stores equal tensors once (the zero biases BN folding leaves
    in an untrained model, tied weights), but the quantiser quantises an
    initializer for one node: a bias shared by layers with different input and
    weight scales gets one node's int32 scale, and ONNX Runtime then cannot
    fuse the others into integer kernels, so they run in float with weights
    dequantised on every call.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model_proto.graph.initializer}
    seen: set[str] = set()
    taken = set(inits)
    for node in model_proto.graph.node:
        if node.op_type not in _LAYER_OPS:
            continue
        for i in range(1, len(node.input)):
            name = node.input[i]
            if name not in inits:
                continue
            if name not in seen:
                seen.add(name)
                continue
            k = 1
            while f"{name}_u{k}" in taken:
                k += 1
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[name]).copy(), f"{name}_u{k}")
            model_proto.graph.initializer.append(copy)
            taken.add(copy.name)
            node.input[i] = copy.name
    return model_proto


# Ops whose inputs after the first are shapes, axes or indices, not data.
_SHAPE_ARGS = ("Reshape", "Slice", "Squeeze", "Unsqueeze", "Split", "Gather", "Expand", "Tile", "Pad", "Resize",
               "Upsample")


def float_island_nodes(model_proto: Any, quantised_layers: Iterable[str], float_out: Iterable[str] = ()) -> list[str]:
    """Non-layer nodes to keep in float: those with an input that is not int8 in the deployed graph.

    Left to itself the quantiser puts every add, pool and concat in int8 as soon
    as one layer is, so a mostly-float model pays a quantise/dequantise pair
    (and ONNX Runtime a layout change) around each of them. Here an op is int8
    only when every tensor it reads is: the output of an int8 conv, or of
    another such op; normalisation and softmax are always float.
    """
    inits = {t.name for t in model_proto.graph.initializer}
    quantised = set(quantised_layers)
    int8: set[str] = set()
    keep_float = []
    for node in model_proto.graph.node:
        data = [] if node.op_type in _FLOAT_OPS else [i for i in node.input if i and i not in inits]
        if node.op_type in _LAYER_OPS:
            if node.name in quantised and node.op_type not in float_out:  # op types that write float
                int8.update(node.output)
            continue
        if node.op_type in ("Constant", "Shape"):
            continue
        if node.op_type in _SHAPE_ARGS:  # a reshape's shape (computed at run time) is not data
            data = data[:1]
        if data and all(i in int8 for i in data):
            int8.update(node.output)
        else:
            keep_float.append(node.name)
    return keep_float


def shapes_from_quantised(model_proto: Any) -> Any:
    """Let Shape nodes read the quantised tensor instead of a DequantizeLinear of it.

    A view whose shape is computed at run time (dynamic batch) reads its input's Shape; after
    quantisation that Shape reads a DequantizeLinear, a full pass over the tensor only to learn
    its shape. The quantised tensor has the same shape, so the Shape reads it and the
    DequantizeLinear is dropped when nothing else reads it.
    """
    producers = _producers(model_proto)
    for node in model_proto.graph.node:
        if node.op_type == "Shape" and node.input and node.input[0] in producers:
            src = producers[node.input[0]]
            if src.op_type == "DequantizeLinear":
                node.input[0] = src.input[0]
    used = {i for n in model_proto.graph.node for i in n.input} | {o.name for o in model_proto.graph.output}
    keep = [n for n in model_proto.graph.node if n.op_type != "DequantizeLinear" or n.output[0] in used]
    if len(keep) != len(model_proto.graph.node):
        del model_proto.graph.node[:]
        model_proto.graph.node.extend(keep)
    return model_proto


class _BatchReader:
    """A CalibrationDataReader over in-memory batches (a tensor or a tuple of tensors, one per ONNX input,
    in order), in chunks of at most 64 samples."""

    def __init__(self, batches: Iterable[Any], input_names: Sequence[str] = ("input",), chunk: int = 64) -> None:
        self._items = []
        for b in batches:
            parts = [t.detach().cpu() for t in as_tuple(b)]
            parts = [t.float() if t.is_floating_point() else t for t in parts]
            for i in range(0, len(parts[0]), chunk):
                self._items.append({n: t[i:i + chunk].numpy() for n, t in zip(input_names, parts)})
        self._it = iter(self._items)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _int4_supported() -> bool:
    """Whether this ONNX Runtime has int4 DequantizeLinear, needed to run int4 QDQ weights."""
    import onnxruntime

    major, minor = (int(p) for p in onnxruntime.__version__.split(".")[:2])
    return (major, minor) >= (1, 18)


def _producers(model_proto: Any) -> dict[str, Any]:
    return {o: n for n in model_proto.graph.node for o in n.output}


def _dq_bits(dq: Any, inits: Mapping[str, Any], producers: Mapping[str, Any]) -> int:
    """Integer bits of the tensor a DequantizeLinear reads (its zero point or initializer's dtype)."""
    for name in (dq.input[2] if len(dq.input) > 2 else "", dq.input[0]):
        if name in inits:
            return _INT_BITS.get(inits[name].data_type, FLOAT)
        src = producers.get(name)
        if src is not None and src.op_type == "QuantizeLinear" and len(src.input) > 2 and src.input[2] in inits:
            return _INT_BITS.get(inits[src.input[2]].data_type, FLOAT)
    return 8


def realised_bits(model_proto: Any, nodes: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Module path -> (weight bits, input bits) as stored in a (QDQ) ONNX model; float is 32.

    ``nodes`` maps module paths to nodes of the float model; the quantiser keeps node names.
    """
    inits = {t.name: t for t in model_proto.graph.initializer}
    producers = _producers(model_proto)
    by_name = {n.name: n for n in model_proto.graph.node}
    out = {}
    for path, float_node in nodes.items():
        node = by_name.get(float_node.name)
        if node is None:
            continue
        bits = []
        for i in (1, 0):  # weight, then input activation
            src = producers.get(node.input[i]) if len(node.input) > i else None
            bits.append(_dq_bits(src, inits, producers) if src is not None and src.op_type == "DequantizeLinear"
                        else FLOAT)
        out[path] = (bits[0], bits[1])
    return out


def _weight_override(node: Any) -> tuple[str, int]:
    """The weight initializer of a conv/linear node and its output-channel axis."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return node.input[1], 0 if trans_b else 1
    if node.op_type == "MatMul":
        return node.input[1], 1
    return node.input[1], 0


def export_int8(float_model: nn.Module, example_input: torch.Tensor, calibration_batches: Iterable[torch.Tensor] | torch.Tensor,
                path: str | os.PathLike, layer_bits: Mapping[str, tuple[int, int]], *,
                fp32_path: str | os.PathLike | None = None, int4: bool = False,
                reduce_range: bool | None = None, static_shapes: bool = False) -> Int8Report:
    """Write ``path`` (QDQ int8/int4 ONNX) from ``float_model`` and per-layer ``layer_bits``.

    ``float_model`` is the compressed model without fake quantisation
    (``compress.quant.strip_fake_quant``); ``layer_bits`` maps module path to
    (wbits, abits) (``compress.quant.layer_bits``); layers it does not list
    stay float. The fp32 ONNX goes to ``fp32_path`` (default: next to ``path``
    as ``*.fp32.onnx``). ``int4=True`` stores weights of layers at <= 4 bits as
    int4; by default they are int8, because ONNX Runtime's CPU provider has no
    int4 conv kernel: an int4 QDQ conv runs in float, its weights dequantised on
    every call, slower than the fp32 model. ``reduce_range`` quantises weights
    to 7 bits; by default it is on where ONNX Runtime's int8 kernels on this
    machine would saturate (``u8s8_saturates``: x86-64 without VNNI), so the
    artifact evaluated here keeps its accuracy. Pass ``False`` for full 8-bit
    weights when the file will only run on VNNI or Arm dot-product CPUs. ``static_shapes``: ``export_onnx``'s.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = Path(path)
    if reduce_range is None:
        reduce_range = u8s8_saturates()
    fp32 = Path(fp32_path) if fp32_path is not None else path.with_name(path.stem + ".fp32.onnx")
    batches = [calibration_batches] if isinstance(calibration_batches, (torch.Tensor, tuple)) else calibration_batches
    export_onnx(float_model, example_input, fp32, static_shapes=static_shapes)
    proto = unshare_initializers(fold_identities(onnx.load(str(fp32))))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(fp32))
    nodes = layer_nodes(proto, call_order(float_model, example_input))
    use_int4 = int4 and _int4_supported()
    exclude, overrides = [], {}
    for mpath, node in nodes.items():
        wb, ab = layer_bits.get(mpath, (FLOAT, FLOAT))
        if wb > 8 or ab > 8:
            exclude.append(node.name)
        elif wb <= 4 and use_int4:
            weight, axis = _weight_override(node)
            overrides[weight] = [{"axis": axis, "quant_type": QuantType.QInt4, "symmetric": True}]
    quantised = [n.name for n in nodes.values() if n.name not in exclude]
    # Layers the exporter did not name after a module stay float too (they are reported as float).
    named = {n.name for n in nodes.values()}
    exclude += [n.name for n in proto.graph.node if n.op_type in _LAYER_OPS and n.name not in named]
    float_out = _FLOAT_OUTPUT_LAYERS if any(n.op_type == "MatMul" for n in nodes.values()) else ()
    exclude += float_island_nodes(proto, quantised, float_out)
    chunk = len(as_tuple(example_input)[0]) if static_shapes else 64  # a static file takes the example's batch
    reader = _BatchReader(batches, [i.name for i in proto.graph.input], chunk=chunk)
    if len(reader) == 0:
        raise AutocompressError("int8 export needs calibration data; pass at least one input batch")
    tmp = path.with_name(path.name + ".tmp")
    if quantised:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantiser logs advice through the root logger; the library stays quiet
        try:
            quantize_static(str(fp32), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                           "TensorQuantOverrides": overrides,
                                           "OpTypesToExcludeOutputQuantization": list(float_out)})
            written = shapes_from_quantised(onnx.load(str(tmp)))
            onnx.checker.check_model(written)
            onnx.save(written, str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise AutocompressError(f"int8 quantisation failed: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        finally:
            root.setLevel(level)
        os.replace(tmp, path)
    else:  # nothing at 8 bits or fewer: the artifact is the float model
        written = proto
        onnx.save(proto, str(path))
    realised = realised_bits(written, nodes)
    layers = tuple(LayerInt8(mpath, node.name, tuple(layer_bits.get(mpath, (FLOAT, FLOAT))),  # type: ignore[arg-type]
                             realised.get(mpath, (FLOAT, FLOAT))) for mpath, node in nodes.items())
    # Layers the exporter did not name after their module cannot be told apart: reported as float.
    layers += tuple(LayerInt8(mpath, None, tuple(bits), (FLOAT, FLOAT))  # type: ignore[arg-type]
                    for mpath, bits in layer_bits.items() if mpath not in nodes)
    return Int8Report(path, fp32, layers, use_int4, tuple(exclude), reduce_range=bool(quantised) and reduce_range)
