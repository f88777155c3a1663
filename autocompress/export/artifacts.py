"""The output folder: policy, ONNX (fp32 and int8), the PyTorch artifact, result.json.

Files are written into a hidden staging folder beside ``out`` and moved in
only when every one of them is complete, so a failure or an interruption
never leaves a half-written artifact in ``out`` (and never touches what a
previous run left there, beyond replacing the same names).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autocompress.errors import EnvironmentProblem, UserInputError
from autocompress.export.fp16 import export_fp16, half_layers
from autocompress.export.onnx import export_onnx
from autocompress.space.costs import runs_int8
from autocompress.space.inputs import Inputs, as_tuple
from autocompress.space.policy import Policy


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_pytorch(model: nn.Module, example_input: Any, folder: Path) -> list[Path]:
    """``model.pt2`` (torch.export: runs without the source code or unpickling it) and the state dict.

    Load with ``torch.export.load(path).module()``; the state dict loads with
    ``torch.load(..., weights_only=True)`` into ``apply(model, policy)``'s output.
    """
    paths = []
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / "model.state.pt")
    paths.append(folder / "model.state.pt")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = _export_program(model.eval(), example_input)
            torch.export.save(program, str(folder / "model.pt2"))
        paths.append(folder / "model.pt2")
    except Exception as exc:  # the state dict above still carries the weights
        (folder / "model.pt2.txt").write_text(f"torch.export failed: {type(exc).__name__}: {exc}\n")
    return paths


def _export_program(model: nn.Module, example_input: Any):
    """torch.export with a dynamic batch dimension where the model allows it, else at the example's batch."""
    args = as_tuple(example_input)
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        doubled = tuple(t.expand(2, *t.shape[1:]).contiguous() for t in args)
        return torch.export.export(model, doubled, dynamic_shapes=tuple({0: batch} for _ in args))
    except Exception:
        return torch.export.export(model, args)


def write_int8_file(float_model: nn.Module, example_input: Any, path: Path, bits: Mapping[str, Any], fp32_path: Path,
                    calibration: Any = None, static_shapes: bool = False) -> Any:
    """``path`` (model.int8.onnx) quantised from ``float_model`` by ``export.int8``, calibrated in batches of 8
    on ``calibration`` (default: 16 generated inputs); the int8 export's report. ``static_shapes``:
    ``export_onnx``'s."""
    from autocompress.export.int8 import export_int8

    calib = calibration if calibration is not None else Inputs.from_example(example_input).example(16, seed=0)
    parts = as_tuple(calib)
    chunks = [tuple(t[i:i + 8] for t in parts) if isinstance(calib, tuple) else calib[i:i + 8]
              for i in range(0, len(parts[0]), 8)]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ONNX Runtime's quantiser logs advice through the root logger
    try:
        with warnings.catch_warnings():  # numpy warnings from the quantiser's range maths on constant tensors
            warnings.simplefilter("ignore")
            return export_int8(float_model, example_input, chunks, path, bits, fp32_path=fp32_path,
                               static_shapes=static_shapes)
    finally:
        root.setLevel(level)


def deployed_file(model: Any, example: Any, folder: Path, calibration: Any = None, int8: bool = True,
                  fp16: bool = False, static_shapes: bool = False) -> Path:
    """The file the target would run, written into ``folder``: model.int8.onnx where a layer runs in
    int8 (``runs_int8``) and ``int8`` (the target has fast int8 kernels), else model.fp16.onnx where a
    layer runs at 16 bits and ``fp16`` (fast fp16 kernels), else model.onnx; ``static_shapes`` as shipped."""
    from autocompress.compress.quant import layer_bits, strip_fake_quant

    float_model = strip_fake_quant(model)
    fp32 = export_onnx(float_model, example, folder / "model.onnx", static_shapes=static_shapes)
    bits = layer_bits(model)
    if not (int8 and any(runs_int8(w, a) for w, a in bits.values())):
        half = half_layers(bits)
        if fp16 and half:
            return export_fp16(float_model, example, fp32, folder / "model.fp16.onnx", set(bits) - half)
        return fp32
    return Path(write_int8_file(float_model, example, folder / "model.int8.onnx", bits, fp32, calibration,
                                static_shapes).path)


def shapes_word(static_shapes: bool) -> str:
    """result.json's ``onnx_shapes``: ``static`` (every dimension fixed) or ``dynamic`` (batch, sequence)."""
    return "static" if static_shapes else "dynamic"


def write_model_files(model: nn.Module, example_input: Any, folder: Path,
                      calibration: Any = None, static_shapes: bool = False) -> dict[str, Any]:
    """model.onnx (fp32), model.int8.onnx where a layer runs in int8 (``runs_int8``), model.fp16.onnx where a
    layer runs at 16 bits (``export.fp16``), model.pt2, model.state.pt. The ONNX files have a dynamic batch
    (and token sequence) axis, or with ``static_shapes`` every dimension of ``example_input``; the returned
    info's ``onnx_shapes`` says which."""
    from autocompress.compress.quant import layer_bits, strip_fake_quant

    info: dict[str, Any] = {"onnx_shapes": shapes_word(static_shapes)}
    float_model = strip_fake_quant(model)
    export_onnx(float_model, example_input, folder / "model.onnx", static_shapes=static_shapes)
    bits = layer_bits(model)
    if any(runs_int8(w, a) for w, a in bits.values()):
        report = write_int8_file(float_model, example_input, folder / "model.int8.onnx", bits, folder / "model.onnx",
                                 calibration, static_shapes)
        data = report.to_json()
        for key in ("path", "fp32_path"):  # staging paths mean nothing once the folder is moved
            data.pop(key, None)
        info["int8"] = data
    half = half_layers(bits)
    if half:
        try:
            export_fp16(float_model, example_input, folder / "model.onnx", folder / "model.fp16.onnx",
                        set(bits) - half)
            info["fp16"] = {"layers": len(half), "float32_layers": len(bits) - len(half)}
        except Exception as exc:  # the fp32 and int8 files still ship; result.json says why this one did not
            (folder / "model.fp16.onnx").unlink(missing_ok=True)
            info["fp16"] = {"layers": len(half), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    save_pytorch(model, example_input, folder)
    return info


STAGING_PREFIX = ".partial-"


def check_out(out: str | os.PathLike) -> None:
    """Refuse an output path that exists and is not a folder, or cannot be written, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {str(out)!r} is a file; give a folder (it is created if missing)")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentProblem(f"--out {str(out)!r}: {str(existing)!r} is not writable; choose a folder you can "
                                 "write to or fix its permissions")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out: Path) -> None:
    """Remove staging folders that killed runs left in ``out`` (their process is gone)."""
    for p in out.glob(f"{STAGING_PREFIX}*") if out.is_dir() else ():
        pid = p.name[len(STAGING_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def commit_folder(out: str | os.PathLike, build: Callable[[Path], Any]) -> Any:
    """Run ``build(staging)`` and move its files into ``out`` only if it succeeds.

    The staging folder lives inside ``out``, so the final renames never cross filesystems (``out``
    may be a mount point: a container volume, a tmpfs)."""
    out = Path(out)
    check_out(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot create --out {str(out)!r}: {exc.strerror or exc}") from None
    clean_stale_staging(out)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    ok = False
    try:
        result = build(staging)
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
        ok = True
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not ok and not any(out.iterdir()):
            out.rmdir()


def write_policy_and_result(folder: Path, policy: Policy, result: Mapping[str, Any]) -> None:
    policy.save(folder / "policy.json")
    write_json(folder / "result.json", result)
