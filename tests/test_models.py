"""Model sources: every registered builtin model and source, spec parsing, weights loading."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from autocompress.errors import SpecError, UnknownNameError, UserInputError, WeightsError
from autocompress.models import BUILTIN_MODELS, MODEL_SOURCES, load_model
from autocompress.models.sources import parse_input_shape, parse_model_spec


@pytest.mark.parametrize("name", BUILTIN_MODELS.names())
def test_builtin_model_runs_at_its_input_shape(name):
    entry = BUILTIN_MODELS.get(name)
    loaded = load_model(f"builtin:{name}")
    assert loaded.input_shape == tuple(entry.input_shape)
    assert not loaded.model.training
    assert entry.description
    with torch.no_grad():
        out = loaded.model(torch.randn(2, *entry.input_shape[1:]))
    assert out.shape[0] == 2 and out.dim() == 2 and torch.isfinite(out).all()


def test_digits_net_size():
    model = load_model("builtin:digits-net").model
    assert sum(p.numel() for p in model.parameters()) == 850_186
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_sources_registry_has_the_contract_sources():
    assert {"builtin", "torchvision"} <= set(MODEL_SOURCES.names())


def test_torchvision_random_init_and_default_shape():
    loaded = load_model("torchvision:resnet18")
    assert loaded.input_shape == (1, 3, 224, 224)
    assert sum(p.numel() for p in loaded.model.parameters()) == 11_689_512
    small = load_model("torchvision:resnet18", input_shape=(1, 3, 64, 64))
    assert small.input_shape == (1, 3, 64, 64)
    assert small.model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_googlenet_has_no_aux_heads():
    model = load_model("torchvision:googlenet").model
    assert not any(n.startswith("aux") for n, _ in model.named_modules())
    assert sum(p.numel() for p in model.parameters()) == 6_624_904


@pytest.mark.parametrize("spec, fragment", [
    ("resnet18", "expected builtin:NAME"),
    ("hub:resnet18", "unknown source 'hub'"),
    ("builtin:", "name the model"),
    ("torchvision:", "name the model"),
    ("model.py:", "factory"),
])
def test_bad_spec_syntax(spec, fragment):
    with pytest.raises(SpecError) as exc:
        parse_model_spec(spec)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(UnknownNameError) as exc:
        load_model("builtin:nope")
    assert "'nope'" in str(exc.value) and "digits-net" in str(exc.value)


def test_unknown_torchvision_model_suggests_close_names():
    with pytest.raises(SpecError) as exc:
        load_model("torchvision:resnet")
    msg = str(exc.value)
    assert "'resnet'" in msg and "resnet18" in msg
    with pytest.raises(SpecError, match="not_a_model"):
        load_model("torchvision:not_a_model")


def test_file_source(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text(textwrap.dedent("""
        import torch.nn as nn
        INPUT_SHAPE = (1, 3, 16, 16)
        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 5))
        def not_a_model():
            return 42
        def broken():
            raise RuntimeError("boom")
    """))
    loaded = load_model(f"{f}:build")
    assert loaded.input_shape == (1, 3, 16, 16)
    assert loaded.model(torch.randn(1, 3, 16, 16)).shape == (1, 5)
    with pytest.raises(SpecError, match="no function 'missing'.*build"):
        load_model(f"{f}:missing")
    with pytest.raises(SpecError, match="returned int"):
        load_model(f"{f}:not_a_model")
    with pytest.raises(SpecError, match="does not exist"):
        load_model(f"{tmp_path / 'absent.py'}:build")


def test_file_source_import_error_is_a_spec_error(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("import not_a_module_anywhere\n")
    with pytest.raises(SpecError, match="ModuleNotFoundError"):
        load_model(f"{f}:build")


def test_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    a = load_model("builtin:digits-net").model
    path = tmp_path / "w.pt"
    torch.save(a.state_dict(), path)
    torch.manual_seed(2)
    b = load_model("builtin:digits-net", weights=path).model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # a checkpoint dict with a "state_dict" entry is unwrapped
    torch.save({"state_dict": a.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    c = load_model("builtin:digits-net", weights=tmp_path / "ckpt.pt").model
    assert torch.equal(c.fc2.weight, a.fc2.weight)


def test_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_model("builtin:digits-net", weights=tmp_path / "absent.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="does not match the model.*missing"):
        load_model("builtin:digits-net", weights=tmp_path / "other.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds a list"):
        load_model("builtin:digits-net", weights=tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="cannot read"):
        load_model("builtin:digits-net", weights=tmp_path / "junk.pt")
    state = load_model("builtin:digits-net").model.state_dict()
    state["fc2.weight"] = torch.zeros(7, 128)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match=r"fc2.weight: \(7, 128\) vs \(10, 128\)"):
        load_model("builtin:digits-net", weights=tmp_path / "shape.pt")


@pytest.mark.parametrize("text, shape", [("1,3,64,64", (1, 3, 64, 64)), ("1x1x32x32", (1, 1, 32, 32)),
                                         ("2, 3, 8, 8", (2, 3, 8, 8))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["abc", "1", "1,0,32,32", "1,-3,32,32", "1,3,3.5,4"])
def test_bad_input_shape(text):
    with pytest.raises(UserInputError, match="bad input shape"):
        parse_input_shape(text)
