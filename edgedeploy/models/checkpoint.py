"""Loading and saving weights with errors a user can act on.

Accepted files: our training checkpoints ({"model": state_dict, "ema": ..., "meta": ...}), a bare state_dict
(e.g. torchvision's), or {"state_dict": ...}, and the official checkpoints of other projects that
`edgedeploy.models.official` recognises (converted by renaming, values unchanged). Class-count mismatches name
the keys and the `--num-classes` fix.

Nothing in a file runs code: plain tensor pickles load with `weights_only=True`; whole-module pickles
(Ultralytics) go through `safe_pickle.restricted_load`, which reads the module classes as inert stand-ins.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from edgedeploy.errors import CheckpointError
from edgedeploy.io import file_key


def _numpy_scalar_globals() -> list[Any]:
    """numpy scalars (np.float64(0.73) from a metric) pickle as `numpy.core.multiarray.scalar(dtype, bytes)`:
    rebuilding one runs no user code, so checkpoints written before meta was made plain still load."""
    import numpy as np

    out: list[Any] = [np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(getattr(__import__(mod, fromlist=["scalar"]), "scalar"))
            break
        except (ImportError, AttributeError):
            continue
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_):
        out.append(type(np.dtype(t)))
    return out


# Allowed on top of torch's weights-only set (tensors, dicts, lists, tuples, str, numbers, OrderedDict): numpy
# scalars, and argparse.Namespace (timm and others save their training args), which only gets attributes set.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


_READ_ONCE: dict[tuple, dict[str, Any]] | None = None  # file_key -> checkpoint, inside `reading_once()`


@contextlib.contextmanager
def reading_once() -> Iterator[None]:
    """Within this block (one CLI command) each checkpoint file version is read from disk once; callers get
    their own dicts and lists (tensors are shared: load them into a model, do not change them in place)."""
    global _READ_ONCE
    outer, _READ_ONCE = _READ_ONCE, ({} if _READ_ONCE is None else _READ_ONCE)
    try:
        yield
    finally:
        _READ_ONCE = outer


def _fresh(obj: Any) -> Any:
    if isinstance(obj, dict):
        return type(obj)((k, _fresh(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_fresh(v) for v in obj]
    return obj


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without running code from it: `torch.load(weights_only=True)` (plus numpy scalars and
    argparse.Namespace); a pickle needing more goes to `safe_pickle.restricted_load`, whose allow-list refuses
    anything that could run code (a pickle calling os.system is refused before any of it runs)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if _READ_ONCE is None:
        return _read_checkpoint(path)
    key = file_key(path)
    if key not in _READ_ONCE:
        _READ_ONCE[key] = _read_checkpoint(path)
    return _fresh(_READ_ONCE[key])


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    from edgedeploy.models.weights_file import _looks_like_safetensors, read_weights_file

    if _looks_like_safetensors(os.fspath(path)):  # timm / hub exports
        return read_weights_file(path)
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals() + SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # needs globals beyond tensors: only the allow-list, module classes inert
        from edgedeploy.models.official.yolov5 import STANDIN_PREFIXES
        from edgedeploy.models.safe_pickle import restricted_load

        obj = restricted_load(path, standin_prefixes=STANDIN_PREFIXES)
    except Exception as e:  # truncated file, not a torch file
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict. Save `model.state_dict()` (or our training "
            "checkpoint), not the whole module."
        )
    return dict(obj)


def extract_state_dict(ckpt: Mapping[str, Any], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint dict (EMA weights first when present)."""
    for key in (("ema", "model", "state_dict") if prefer_ema else ("model", "ema", "state_dict")):
        sd = ckpt.get(key)
        if isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            return _strip_prefix(dict(sd))
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _strip_prefix(dict(ckpt))
    raise CheckpointError(
        "checkpoint is not a state dict: expected tensors, or a dict with a 'model'/'ema'/'state_dict' entry "
        f"(found keys: {', '.join(list(ckpt)[:8])})"
    )


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP / torch.compile wrappers prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise a CheckpointError naming missing, unexpected and mis-shaped keys (with the likely fix)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if not (missing or unexpected or shape):
        return
    lines = ["checkpoint does not match the model:"]
    if shape:
        lines.append("  mismatched shapes (checkpoint vs model):")
        lines += [f"    {k}: {a} vs {b}" for k, a, b in shape[:10]]
        head = [(k, a, b) for k, a, b in shape if len(a) >= 1 and len(b) >= 1 and a[1:] == b[1:] and a[0] != b[0]]
        if head and len(head) == len(shape):
            lines.append(
                f"  the output layer has {head[0][1][0]} classes in the checkpoint and {head[0][2][0]} in the model: "
                f"pass `--num-classes {head[0][1][0]}` (or num_classes={head[0][1][0]})."
            )
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        lines.append(
            f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
        lines.append("  is this a checkpoint of another model? `deploy models` lists the variants.")
    raise CheckpointError("\n".join(lines))


log = logging.getLogger("edgedeploy")


@dataclass
class Weights:
    """A checkpoint resolved for one model: the state dict in our layout and its metadata.

    For an official checkpoint, `meta` carries `source`, `preprocess` (the original's input convention,
    `InputConvention` field names), `num_classes`, `class_names`, `model_name` and `notes`."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # architecture options an official file implies

    @property
    def official(self) -> bool:
        return bool(self.meta.get("source"))


def _our_state_dict(ckpt: Mapping[str, Any], prefer_ema: bool) -> dict[str, torch.Tensor] | None:
    try:
        return extract_state_dict(ckpt, prefer_ema=prefer_ema)
    except CheckpointError:
        return None


def resolve_weights(path: str | os.PathLike, model_name: str, model: nn.Module | None = None,
                    prefer_ema: bool = True) -> Weights:
    """Read `path` for registry model `model_name`: our layout when it fits (`model`, if given, decides), else an
    official format converted to ours. Raises naming the variant a file really is, or the mismatched keys and
    the recognised formats."""
    ckpt = read_checkpoint(path)
    sd = _our_state_dict(ckpt, prefer_ema)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if sd is not None and (meta or (model is not None and _fits(model, sd))):
        return Weights(sd, dict(meta), dict(meta.get("model_kwargs") or {}))
    from edgedeploy.models.official import convert_official, known_formats

    conv = convert_official(ckpt, model_name)
    if conv is None:
        if sd is None:
            raise CheckpointError(
                f"{path}: not a state dict nor a recognised official checkpoint (found keys: "
                f"{', '.join(list(ckpt)[:8])}). Recognised: our `deploy train` checkpoints, bare state dicts "
                f"(torchvision), {', '.join(known_formats())}.")
        if model is None:
            return Weights(sd, dict(meta))
        try:
            check_state_dict(model, sd)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}\n  recognised formats: our `deploy train` checkpoints, bare state "
                                  f"dicts in our layout (torchvision's), {', '.join(known_formats())}") from None
        return Weights(sd, dict(meta))
    if conv.variant is not None and conv.variant != model_name:
        raise CheckpointError(
            f"{path} is a {conv.source} checkpoint of {conv.variant}, not {model_name}: use --model {conv.variant} "
            f"(create_model({conv.variant!r}, weights=...)).")
    if conv.variant is None:
        raise CheckpointError(
            f"{path} is a {conv.source} checkpoint, but of a width/depth that no registered variant has "
            f"(asked for {model_name}). `deploy models` lists the variants.")
    for note in conv.notes:
        log.info(note)
    meta = _official_meta(conv)
    return Weights(conv.state_dict, meta, dict(meta.get("model_kwargs") or {}))


def _official_meta(conv: Any) -> dict[str, Any]:
    """What an official checkpoint says about itself: source, input convention, variant, class count (names),
    and the architecture options (`model_kwargs`, e.g. ShuffleNetV1's shuffle placement) its model needs."""
    meta = {"source": conv.source, "preprocess": dict(conv.preprocess), "model_name": conv.variant,
            "notes": list(conv.notes)}
    nc = conv.model_kwargs.get("num_classes")
    if nc:
        meta["num_classes"] = int(nc)
    if conv.class_names:
        meta["class_names"] = list(conv.class_names)
    kwargs = {k: v for k, v in conv.model_kwargs.items() if k != "num_classes"}
    if kwargs:
        meta["model_kwargs"] = kwargs
    return meta


def _fits(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return set(own) == set(sd) and all(own[k].shape == sd[k].shape for k in own)


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself, typed: ours (`meta` written by `deploy train`) or, for an official
    file, its source, input convention, variant and class count. Frozen; `as_dict()` gives a private copy."""

    model_name: str | None = None
    task: str | None = None
    imgsz: int | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    preprocess: Mapping[str, Any] = field(default_factory=dict)  # InputConvention fields (official files)
    source: str = ""  # e.g. "megvii-yolox" for an official checkpoint
    data: str | None = None  # the training data (absolute path, or "synthetic")
    data_as_typed: str | None = None
    synthetic: Mapping[str, Any] | None = None  # the synthetic set's generator parameters
    ignore_index: int | None = None
    train_args: Mapping[str, Any] = field(default_factory=dict)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)  # the meta dict as stored

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> "CheckpointMeta":
        m = copy.deepcopy(dict(meta))
        imgsz, nc = m.get("imgsz"), m.get("num_classes")

        def ro(key: str) -> Mapping[str, Any]:
            return MappingProxyType(dict(m.get(key) or {}))

        return cls(
            model_name=m.get("model_name") or None, task=m.get("task") or None,
            imgsz=int(imgsz) if imgsz else None, num_classes=int(nc) if nc else None,
            class_names=tuple(str(c) for c in m.get("class_names") or ()), preprocess=ro("preprocess"),
            source=str(m.get("source") or ""), data=str(m["data"]) if m.get("data") else None,
            data_as_typed=m.get("data_as_typed") or None, synthetic=ro("synthetic") if m.get("synthetic") else None,
            ignore_index=m.get("ignore_index"), train_args=ro("train_args"), model_kwargs=ro("model_kwargs"),
            notes=tuple(m.get("notes") or ()), raw=MappingProxyType(m))

    def as_dict(self) -> dict[str, Any]:
        """The stored meta dict (a copy the caller may change)."""
        return copy.deepcopy(dict(self.raw))


_META_CACHE: "OrderedDict[tuple, CheckpointMeta]" = OrderedDict()


def read_checkpoint_meta(path: str | os.PathLike, model_name: str | None = None) -> CheckpointMeta:
    """The one reader of a checkpoint's metadata, without building the model: ours, or for an official file what
    its layout says (`model_name` None: any variant of an official family). Cached per file version."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    key = (*file_key(path), model_name or "")
    if key not in _META_CACHE:
        _META_CACHE[key] = CheckpointMeta.from_dict(_meta_dict(read_checkpoint(path), model_name))
        while len(_META_CACHE) > 16:
            _META_CACHE.popitem(last=False)
    return _META_CACHE[key]


def _meta_dict(ckpt: Mapping[str, Any], model_name: str | None) -> dict[str, Any]:
    meta = ckpt.get("meta")
    if isinstance(meta, dict):
        return meta
    from edgedeploy.models.official import convert_official

    conv = convert_official(ckpt, model_name or "")
    return {} if conv is None else _official_meta(conv)


def apply_weights(model: nn.Module, weights: Weights) -> dict[str, Any]:
    try:
        check_state_dict(model, weights.state_dict)
    except CheckpointError:
        saved, info = weights.meta.get("model_name"), getattr(model, "model_info", None)
        if saved and info is not None and saved != info.name:  # a checkpoint of another model: say which
            raise CheckpointError(
                f"this is a checkpoint of {saved} (recorded in its meta), not of {info.name}: pass --model {saved}, "
                "or leave --model out and it is taken from the checkpoint"
            ) from None
        raise
    model.load_state_dict(weights.state_dict, strict=True)
    return weights.meta


def load_weights(model: nn.Module, path: str | os.PathLike, prefer_ema: bool = True,
                 model_name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (ours or official) into `model` strictly. Returns the checkpoint's metadata (may be
    empty; for an official file it holds `source` and `preprocess`)."""
    info = getattr(model, "model_info", None)
    name = model_name or (info.name if info is not None else "")
    return apply_weights(model, resolve_weights(path, name, model=model, prefer_ema=prefer_ema))
