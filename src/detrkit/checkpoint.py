"""Saving and loading weights: detrkit's own format, and the one entry point :func:`load_model`.

detrkit format: a folder with ``model.safetensors`` (the weights; the JSON config is also
kept in its metadata) and ``config.json``::

    {"format": "detrkit", "format_version": 1,
     "model": {...ModelConfig...},
     "classes": [{"index": 0, "id": 3, "name": "circle"}, ...]}

A training run's checkpoint (``last/``) also holds ``train_state.pt``, what is needed to continue
the run (:func:`save_run_checkpoint`). A folder is written as one unit (:func:`checkpoint_folder`:
beside it, then two renames), so a process killed during a save leaves the previous checkpoint
whole, training state included.

``load_model`` also reads an official DETR checkpoint (``.pth``: a dict whose ``model`` entry
is the state dict, as published for R50/R101/DC5), a Hugging Face ``DetrForObjectDetection``,
``RTDetrForObjectDetection`` or ``RTDetrV2ForObjectDetection`` folder (``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``), through :mod:`detrkit.convert`, and an RT-DETR v1/v2
release ``.pth`` (lyuwenyu/RT-DETR), through :mod:`detrkit.rtdetr_release`. Every key and shape is
checked; nothing is ever unpickled beyond tensors (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from detrkit.config import ModelConfig, config_from_dict
from detrkit.convert import COCO_NAMES, HF_MODEL_TYPES, Loaded, hf_model_config, load_huggingface, load_official
from detrkit.errors import CheckpointError, DetrkitError
from detrkit.files import read_json
from detrkit.model.build import build_model
from detrkit.model.detr import DETR
from detrkit.rtdetr_release import is_release_file, load_release, release_file_config

FORMAT_VERSION = 1
PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------
# Class mapping: index -> dataset category id and name.
# ---------------------------------------------------------------------------------------------
def default_classes(num_classes: int) -> list[dict]:
    """Index i is category id i. For 91 classes these are COCO's ids and names (official checkpoints)."""
    names = COCO_NAMES if num_classes == 91 else {}
    return [{"index": i, "id": i, "name": names.get(i, "N/A" if names else str(i))} for i in range(num_classes)]


def set_classes(model: DETR, classes: Optional[list[dict]]) -> None:
    """Attach the class mapping (``[{"index", "id", "name"}]`` in index order) to a model."""
    classes = classes if classes is not None else default_classes(model.num_classes)
    if len(classes) != model.num_classes:
        raise CheckpointError(f"class mapping has {len(classes)} entries but the model has {model.num_classes} classes")
    model.classes = [{"index": i, "id": int(c["id"]), "name": str(c["name"])} for i, c in enumerate(classes)]


# ---------------------------------------------------------------------------------------------
# detrkit format
# ---------------------------------------------------------------------------------------------
def save_model(model: DETR, path: PathLike, *, classes: Optional[list[dict]] = None,
               inference: Optional[dict] = None) -> Path:
    """Save weights, model config and class mapping into the folder ``path``.

    ``inference`` records how images are sized for this model (``image_size``, ``max_size``, ``resize``);
    ``predict`` uses it.

    The folder is replaced as a whole (see :func:`checkpoint_folder`), so a process killed
    mid-save leaves the previous checkpoint complete. It must hold a checkpoint and nothing
    else: an existing folder that is not a detrkit checkpoint is refused, not replaced.
    """
    with checkpoint_folder(path) as tmp:
        write_model_files(model, tmp, classes=classes, inference=inference)
    return Path(path)


def write_model_files(model: DETR, folder: Path, *, classes: Optional[list[dict]] = None,
                      inference: Optional[dict] = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (an existing folder; not
    atomic by itself: use it inside :func:`checkpoint_folder`, as :func:`save_model` does)."""
    if classes is not None:
        set_classes(model, classes)
    meta = {
        "format": "detrkit",
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.config),
        "classes": getattr(model, "classes", None) or default_classes(model.num_classes),
        "inference": inference or model.inference,
    }
    text = json.dumps(meta, indent=2)
    # safetensors refuses shared or non-contiguous storage: give it plain copies.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"detrkit": text})
    _test_pause("between-files")
    (folder / "config.json").write_text(text + "\n")


# ---------------------------------------------------------------------------------------------
# A checkpoint folder written as one unit
# ---------------------------------------------------------------------------------------------
def _siblings(path: Path) -> tuple[Path, Path]:
    """The two hidden folders beside checkpoint folder ``path`` that a save uses: new and old."""
    return path.parent / f".{path.name}.new", path.parent / f".{path.name}.old"


@contextmanager
def checkpoint_folder(path: PathLike) -> Iterator[Path]:
    """Write a checkpoint folder as one unit.

    Yields an empty temporary folder beside ``path`` (``.NAME.new``) to write every file into.
    When the block ends without an error, the files are fsync'd and the folder takes the place
    of ``path`` by two renames: ``path`` -> ``.NAME.old``, ``.NAME.new`` -> ``path``; then the
    old one is deleted. A process killed at any moment therefore leaves either the previous
    folder at ``path``, complete, or (killed between the two renames) no ``path`` and the
    previous folder complete in ``.NAME.old``: readers use it (:func:`readable_folder`) and the
    next save moves it back first. The new folder is never trusted until it has been renamed.
    (Renaming one folder over another in a single step has no portable call.)
    """
    path = Path(path)
    new, old = _siblings(path)
    _recover(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not _is_detrkit_folder(path))):
        raise CheckpointError(f"{path}: exists and is not a detrkit checkpoint folder; refusing to replace it "
                              f"(choose a new folder)")
    new.mkdir(parents=True)
    try:
        yield new
        for f in new.iterdir():
            _fsync(f)
        _fsync(new)
        if path.exists():
            os.replace(path, old)
            _test_pause("between-renames")
        os.replace(new, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # gone after the rename; a partial folder after an error
    shutil.rmtree(old, ignore_errors=True)


def save_run_checkpoint(folder: PathLike, model: DETR, optimizer, state: dict, inference: dict) -> None:
    """``model`` (detrkit format: the weights for inference) + the training state needed to continue
    exactly, written as one unit: a kill mid-save leaves the previous weights and state together."""
    with checkpoint_folder(folder) as tmp:
        write_model_files(model, tmp, inference=inference)
        torch.save({"optimizer": optimizer.state_dict(), **state}, tmp / "train_state.pt")


def load_train_state(folder: PathLike) -> dict:
    """``train_state.pt`` of a run checkpoint (:func:`save_run_checkpoint`): tensors and plain values only."""
    path = readable_folder(folder) / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DetrkitError(f"{path}: no training state to resume from") from None
    except Exception as e:  # noqa: BLE001
        raise DetrkitError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None


def read_run_checkpoint(folder: PathLike) -> dict:
    """A run checkpoint (:func:`save_run_checkpoint`, a run's ``last/``) to continue from: the training
    state, the raw weights (``model``) and the weights for inference (``weights``, the EMA when there is one)."""
    saved = load_train_state(folder)
    weights = load_state(folder).state
    # With an EMA, model.safetensors holds the average and train_state.pt the raw weights.
    return {"train_state": saved, "weights": weights, "model": saved.pop("model", weights)}


def readable_folder(path: PathLike) -> Path:
    """The folder to read checkpoint ``path`` from: ``path`` itself, or the complete previous
    checkpoint in ``.NAME.old`` when a save was killed between its two renames. Reading never
    renames anything (a save may be running in another process)."""
    path = Path(path)
    old = _siblings(path)[1]
    return old if not path.exists() and old.is_dir() else path


def _recover(path: Path) -> None:
    """Undo what a killed save left beside ``path``: the previous folder goes back in place,
    a partial new one is deleted."""
    new, old = _siblings(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _is_detrkit_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == "detrkit"
    except (OSError, ValueError, AttributeError):
        return False


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; folders cannot be opened on Windows: skipped there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause(point: str) -> None:
    """Fault injection for tests: with the environment variable ``DETRKIT_TEST_SAVE_PAUSE`` set
    to ``point`` (``between-files`` or ``between-renames``), a save announces
    ``paused at POINT`` on stderr and sleeps there for a minute, so a test can kill the process at
    that exact moment. Unset (always, outside tests) it does nothing.

    Why an environment variable: the save runs in a child process that a test kills with SIGKILL
    (tests/test_checkpoint.py), and no moment inside a save can be hit from outside by timing."""
    if os.environ.get("DETRKIT_TEST_SAVE_PAUSE") == point:
        print(f"paused at {point}", file=sys.stderr, flush=True)
        time.sleep(60)


def _load_detrkit(path: Path) -> Loaded:
    weights = path / "model.safetensors" if path.is_dir() else path
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e}); is it truncated?") from None
    config, meta = _detrkit_config(weights)
    return Loaded(config, state, meta.get("classes"), meta.get("inference"))


def _detrkit_config(weights: Path) -> tuple[ModelConfig, dict]:
    """The model config and the whole metadata of a detrkit checkpoint: ``config.json`` beside
    ``weights``, or the same JSON kept in the safetensors file's metadata."""
    cfg_file = weights.parent / "config.json"
    if cfg_file.exists():
        meta = read_json(cfg_file, CheckpointError, "checkpoint config")
    else:  # the weights file alone carries the same config in its metadata
        try:
            with safe_open(str(weights), "pt") as f:
                text = (f.metadata() or {}).get("detrkit")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({e}); is it truncated?") from None
        if text is None:
            raise CheckpointError(f"{weights}: no config.json beside it and no detrkit metadata inside")
        meta = json.loads(text)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format version {meta['format_version']} is newer than this detrkit "
                              f"reads ({FORMAT_VERSION}); upgrade detrkit")
    try:
        return config_from_dict(ModelConfig, meta["model"]), meta
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: invalid model config ({e})") from None


# ---------------------------------------------------------------------------------------------
# The one entry point
# ---------------------------------------------------------------------------------------------
def detect_format(path: PathLike) -> str:
    """``"detrkit"``, ``"huggingface"``, ``"official"`` (DETR) or ``"rtdetr_release"``, from the files alone.

    A ``.pth`` is an RT-DETR release file when its state dict has the release's keys (looked at with
    the tensors left on disk), otherwise an official DETR one, whose reader then names what is missing.
    """
    path = readable_folder(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{path}: a checkpoint folder needs a config.json")
        cfg = read_json(cfg_file, CheckpointError, "checkpoint config")
        if cfg.get("format") == "detrkit":
            return "detrkit"
        if cfg.get("model_type") in HF_MODEL_TYPES:
            return "huggingface"
        raise CheckpointError(f"{cfg_file}: neither a detrkit config nor a Hugging Face one of a model_type detrkit "
                              f"reads ({', '.join(HF_MODEL_TYPES)}); got model_type {cfg.get('model_type')!r}")
    if path.suffix == ".safetensors":
        return "detrkit"
    return "rtdetr_release" if is_release_file(path) else "official"


def load_state(path: PathLike) -> Loaded:
    """Read any supported checkpoint: its config, its state dict in our names, its class mapping
    and its image sizing (a :class:`~detrkit.convert.Loaded`)."""
    path = readable_folder(path)
    loader = {"detrkit": _load_detrkit, "huggingface": load_huggingface, "official": load_official,
              "rtdetr_release": load_release}
    return loader[detect_format(path)](path)


def checkpoint_config(path: PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of any checkpoint :func:`load_model` reads; folders are not read
    beyond their config (an official ``.pth`` is read whole, a release one's shapes only: their
    config is in their shapes)."""
    path = readable_folder(path)
    kind = detect_format(path)
    if kind == "detrkit":
        return _detrkit_config(path / "model.safetensors" if path.is_dir() else path)[0]
    if kind == "huggingface":
        return hf_model_config(read_json(path / "config.json", CheckpointError, "checkpoint config"),
                               str(path / "config.json"))
    if kind == "rtdetr_release":
        return release_file_config(path)
    return load_official(path).config


def check_and_load(model: DETR, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after checking every key and shape; errors name them all."""
    own = model.state_dict()
    unexpected = sorted(k.removeprefix("unexpected:") for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        lines = [f"{source}: weights do not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state)


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu", precision: str = "fp32") -> DETR:
    """Load a detrkit, official DETR, Hugging Face DETR / RT-DETR (v1, v2) or RT-DETR release checkpoint,
    ready for inference.

    Returns the model in eval mode on ``device`` with its class mapping in ``model.classes``.
    Inference is exact (the outputs of the plain modules to float32 rounding) and faster than
    the plain modules: BatchNorm folded into the backbone's convolutions, channels-last
    activations (:mod:`detrkit.model.backbone`). ``precision="bf16"`` runs the network under
    bfloat16 autocast with the folded convolution weights kept in bfloat16; outputs, and so
    postprocessing and matching, stay float32. It is faster only where bfloat16 matrix products
    are faster than float32 ones (GPUs; CPUs with AMX), see docs/benchmarks.md.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    config, state, classes, inference, _ = load_state(path)
    model = build_model(config)
    check_and_load(model, state, str(path))
    set_classes(model, classes)
    if inference:
        model.inference = dict(inference)
    model.precision = precision
    return model.to(device).eval()
