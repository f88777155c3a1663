"""Model sources: ``builtin:NAME``, ``torchvision:NAME`` and ``path/file.py:factory``.

Each source is a registry entry that turns the part after the colon into a
module and a default input shape. Nothing here downloads weights: torchvision
models are built with random initialisation unless a weights file is given.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from autocompress.errors import SpecError, UserInputError, WeightsError
from autocompress.registry import Registry
from autocompress.userfile import call_factory, import_function


@dataclass
class LoadedModel:
    spec: str
    model: nn.Module
    input_shape: tuple[int, ...]
    example_input: Any = None  # a file's EXAMPLE_INPUT (tensor or tuple, any dtype), where it defines one


@dataclass(frozen=True)
class BuiltinModel:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str


MODEL_SOURCES: Registry[Callable[[str], tuple[nn.Module, tuple[int, ...]]]] = Registry("model source")
BUILTIN_MODELS: Registry[BuiltinModel] = Registry("builtin model")


def _digits_net() -> nn.Module:
    from autocompress.models.digits import DigitsNet

    return DigitsNet()


BUILTIN_MODELS.register(
    "digits-net",
    BuiltinModel(_digits_net, (1, 1, 32, 32), "GoogLeNet-style CNN for sklearn digits at 32x32"),
)


@MODEL_SOURCES.register("builtin")
def _builtin(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    entry = BUILTIN_MODELS.get(name)
    return entry.factory(), entry.input_shape


_TV_EXTRA_KWARGS = {
    # The auxiliary heads are not part of the deployed network (and are not
    # counted in torchvision's published MACs).
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@MODEL_SOURCES.register("torchvision")
def _torchvision(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        close = [v for v in valid if name.lower() in v][:8]
        hint = f" (did you mean: {', '.join(close)}?)" if close else " (see torchvision.models.list_models())"
        raise SpecError(f"unknown torchvision model {name!r}{hint}")
    model = torchvision.models.get_model(name, weights=None, **_TV_EXTRA_KWARGS.get(name, {}))
    size = 299 if name == "inception_v3" else 224
    return model, (1, 3, size, size)


def _from_file(path: str, factory: str) -> tuple[nn.Module, tuple[int, ...], Any]:
    fn, mod = import_function(path, factory, SpecError, "model")
    model = call_factory(fn, f"{path}:{factory}", SpecError)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{path}:{factory} returned {type(model).__name__}, not a torch.nn.Module")
    example = getattr(mod, "EXAMPLE_INPUT", None)  # models that take token ids or several inputs
    if callable(example):
        example = call_factory(example, f"{path}:EXAMPLE_INPUT", SpecError)
    shape = getattr(mod, "INPUT_SHAPE", None) or getattr(model, "input_shape", None) or (1, 3, 224, 224)
    return model, tuple(int(s) for s in shape), example


def parse_model_spec(spec: str) -> tuple[str, str]:
    """Split a spec into (source, argument); file specs return ("file", "path:factory")."""
    if ":" not in spec:
        raise SpecError(
            f"bad model spec {spec!r}: expected builtin:NAME, torchvision:NAME or path/to/file.py:factory"
        )
    head, _, tail = spec.rpartition(":") if ".py:" in spec else spec.partition(":")
    if ".py:" in spec:
        if not tail:
            raise SpecError(f"bad model spec {spec!r}: name the factory function after the colon")
        return "file", f"{head}:{tail}"
    if head not in MODEL_SOURCES:
        raise SpecError(
            f"bad model spec {spec!r}: unknown source {head!r}; expected one of "
            f"{', '.join(MODEL_SOURCES.names())} or path/to/file.py:factory"
        )
    if not tail:
        raise SpecError(f"bad model spec {spec!r}: name the model after the colon")
    return head, tail


def parse_input_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    try:
        shape = tuple(int(p) for p in parts)  # an empty or non-numeric part is an error, never skipped
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise UserInputError(f"bad input shape {text!r}: expected positive integers like 1,3,224,224")
    return shape


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict without unpickling arbitrary objects; mismatches are user errors."""
    try:
        with warnings.catch_warnings():  # torch warns about a pickle's protocol before refusing it: one line only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file {str(path)!r} does not exist") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "empty or truncated file"
        raise WeightsError(f"cannot read weights file {str(path)!r} as a state dict ({type(exc).__name__}: "
                           f"{reason})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith("aux")]
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(f"weights file {str(path)!r} does not match the model: " + "; ".join(parts))
    model.load_state_dict({k: v for k, v in state.items() if k in own})


def load_model(
    spec: str,
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Resolve a model spec to an eval-mode module and its input shape."""
    source, arg = parse_model_spec(spec)
    example = None
    if source == "file":
        path, _, factory = arg.rpartition(":")
        model, shape, example = _from_file(path, factory)
    else:
        model, shape = MODEL_SOURCES.get(source)(arg)
    if weights is not None:
        load_weights(model, weights)
    if input_shape:
        example = None  # the user's shape wins over the file's example
    return LoadedModel(spec, model.eval(), tuple(input_shape) if input_shape else shape, example)
