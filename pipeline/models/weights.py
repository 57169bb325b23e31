"""Load initial weights into a network: a checkpoint file or torchvision's released weights.

``source`` (``ModelSpec.weights`` / ``TeacherSpec.weights``) is either

- a checkpoint path holding a state dict, or a dict with one under ``model`` (the format of
  HobbitLong/RepDistiller's released CIFAR teachers, e.g. ``wrn_40_2_vanilla/ckpt_epoch_240.pth``,
  and of our own trainer) or under ``state_dict``. A ``module.`` (DDP) or ``_orig_mod.``
  (torch.compile) prefix on every key is removed. The file is read with ``weights_only=True``, so
  a checkpoint that pickles arbitrary objects is refused rather than executed (``trusted=True``
  lifts that for files you made yourself). The load is strict: a key missing, unexpected or of
  another shape is an error that lists the first few and names the file.
- ``torchvision:<ENUM>`` (``torchvision:IMAGENET1K_V1``, ``torchvision:DEFAULT``): the weights
  enum of the torchvision architecture the net wraps (its ``tv_arch``), resolved through
  torchvision's weights API (``get_model_weights``) and fetched into the torch hub cache. Offline,
  the error names the file to place in the cache, or says to pass a local path instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

TORCHVISION_PREFIX = "torchvision:"
STATE_KEYS = ("model", "state_dict")
PREFIXES = ("module.", "_orig_mod.")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_weights(model: nn.Module, source: str, trusted: bool = False) -> dict[str, Any]:
    """Load ``source`` (a checkpoint path or ``torchvision:<ENUM>``) into ``model``, strictly.

    Returns ``{"source", "path", "sha256"}``: the source string, the file read and its SHA-256
    (for torchvision weights, the cached download). Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` for an unreadable or non-matching checkpoint or an unknown enum.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    state, path = source_state(model, source, trusted)
    load_strict(model, state, str(path))
    return weights_info(source, path)


def source_state(
    model: nn.Module, source: str, trusted: bool = False
) -> tuple[dict[str, Tensor], Path]:
    """The state dict ``source`` names (for ``model``'s torchvision arch if ``torchvision:``)
    and the file it was read from; nothing is loaded."""
    if source.startswith(TORCHVISION_PREFIX):
        return _torchvision_state(model, source[len(TORCHVISION_PREFIX):], source)
    path = Path(source).expanduser()
    return read_state_dict(path, trusted), path


def weights_info(source: str, path: Path) -> dict[str, Any]:
    """``{"source", "path", "sha256"}`` of weights read from ``path``."""
    return {"source": source, "path": str(path),
            "sha256": file_sha256(path) if path.is_file() else None}


def read_state_dict(path: str | os.PathLike[str], trusted: bool = False) -> dict[str, Tensor]:
    """The model state dict stored in a checkpoint file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights: expected a checkpoint file at {str(path)!r}, found "
            f"{'a directory' if path.is_dir() else 'nothing'} there")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # every unpickling failure means the same thing to the user
        raise ValueError(
            f"weights: could not read {str(path)!r} as a tensors-only checkpoint "
            f"(torch.load weights_only=True: {type(err).__name__}: {err}); save the model's "
            f"state_dict, or pass trusted=True for a file you made yourself") from err
    return strip_prefixes(extract_state_dict(obj, str(path)))


def extract_state_dict(obj: object, where: str) -> dict[str, Tensor]:
    """A raw state dict, or the one under ``model`` or ``state_dict``."""
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _is_state_dict(inner):
                return dict(inner)
        if _is_state_dict(obj):
            return dict(obj)
        found = f"a dict with keys {', '.join(repr(k) for k in list(obj)[:8])}"
    else:
        found = f"a {type(obj).__name__}"
    raise ValueError(
        f"weights: {where}: expected a state dict or a dict holding one under "
        f"{' or '.join(repr(k) for k in STATE_KEYS)}, found {found}")


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove a ``module.`` / ``_orig_mod.`` prefix that every key carries (repeatedly)."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


class WeightsMismatch(ValueError):
    """A checkpoint that does not fit the network; ``first`` describes the first tensor (in the
    network's order) that is missing or of another shape, else the first unexpected one."""

    def __init__(self, message: str, first: str) -> None:
        super().__init__(message)
        self.first = first


def first_mismatch(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str | None:
    """The first tensor of ``own`` (in order) missing from ``state`` or of another shape, else
    the first tensor of ``state`` that ``own`` lacks; None when they fit."""
    for key, tensor in own.items():
        if key not in state:
            return f"{key} {tuple(tensor.shape)} is missing from the file"
        if state[key].shape != tensor.shape:
            return (f"{key} is {tuple(state[key].shape)} in the file but "
                    f"{tuple(tensor.shape)} in the network")
    extra = [k for k in state if k not in own]
    return f"{extra[0]} is in the file but not in the network" if extra else None


def load_strict(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that lists what differs
    (``WeightsMismatch``, a ValueError)."""
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"first mismatch: {first_mismatch(own, state)}"]
        if missing:
            parts.append(f"{len(missing)} missing: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
        if reshaped:
            shapes = [f"{k} {tuple(state[k].shape)} in file vs {tuple(own[k].shape)} in model"
                      for k in reshaped]
            parts.append(f"{len(reshaped)} of another shape: {_first(shapes)}")
        raise WeightsMismatch(
            f"weights: {where} does not fit {type(model).__name__} "
            f"({len(own)} tensors expected): " + "; ".join(parts),
            first_mismatch(own, state) or "")
    model.load_state_dict(state, strict=True)


def load_weights_for(model: nn.Module, source: str, arch: str, section: str) -> dict[str, Any]:
    """``load_weights`` for the network of a config section (``model`` or ``teacher``): any
    failure becomes a ConfigError naming ``<section>.weights``, ``<section>.arch`` and, for a
    checkpoint that does not fit, the first mismatching tensor."""
    from pipeline.config.errors import ConfigError

    weights_key, arch_key = f"{section}.weights", f"{section}.arch"
    try:
        return load_weights(model, source)
    except WeightsMismatch as err:
        raise ConfigError(
            f"{weights_key}: {source} does not fit {arch_key} {arch!r}: first mismatch: "
            f"{err.first}; set {arch_key} to the network the file was saved from, or "
            f"{weights_key} to a checkpoint of {arch!r} ({str(err).removeprefix('weights: ')})"
        ) from None
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{weights_key}: {str(err).removeprefix('weights: ')}") from None


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps (and looks for) the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_state(model: nn.Module, enum_name: str,
                       source: str) -> tuple[dict[str, Tensor], Path]:
    arch = getattr(model, "tv_arch", None)
    if arch is None:
        raise ValueError(
            f"weights: {source!r} needs a torchvision net (resnet18, resnet34, resnet50, "
            f"mobilenet_v2), found {type(model).__name__}, which has no torchvision weights")
    enum = torchvision.models.get_model_weights(arch)
    names = list(enum.__members__)
    if enum_name not in names:
        raise ValueError(
            f"weights: {source!r}: expected one of {', '.join(names)} for {arch}, "
            f"found {enum_name!r}")
    weights = enum[enum_name]
    path = hub_checkpoint_path(weights.url)
    try:
        state = torch.hub.load_state_dict_from_url(
            weights.url, model_dir=str(path.parent), map_location="cpu", progress=False,
            check_hash=True, weights_only=True)
    except Exception as err:  # URLError, timeouts, hash mismatch, ...: all need the same fix
        raise RuntimeError(
            f"weights: could not fetch {source!r} ({weights}) from {weights.url}: "
            f"{type(err).__name__}: {err}. Offline, download that file elsewhere and place it "
            f"at {path} (the torch hub cache; TORCH_HOME moves it), or pass the checkpoint's "
            f"local path as weights instead") from err
    return dict(state), path
