"""Reading pickled checkpoints without running code from them.

`torch.load(weights_only=False)` executes whatever the pickle asks for (any importable callable with any
arguments). Whole-model checkpoints such as Ultralytics YOLOv5's `.pt` need their project's classes to unpickle
normally. `restricted_load` reads them with an allow-list instead:

* tensors and storages (torch's own rebuild functions), `collections.OrderedDict` and a few plain builtins;
* module classes whose name starts with a prefix in `standin_prefixes` (e.g. ``models.yolo``, ``torch.nn.modules``)
  become inert stand-ins (`StandIn`): an empty object whose state (`_parameters`, `_buffers`, `_modules`, ...)
  is stored as data; no code of the original class is imported or run;
* any other global is refused with `UnsafePickleError`, naming it and saying how to convert the file safely.

`module_state_dict(obj)` walks a stand-in module tree into a flat state dict, as `nn.Module.state_dict` would.
"""

from __future__ import annotations

import os
import pickle
import types
from collections import OrderedDict
from typing import Any, Iterable

import torch

from edgedeploy.errors import CheckpointError


class UnsafePickleError(CheckpointError):
    """The pickle asks for a global outside the allow-list."""


class StandIn:
    """Inert placeholder for a class we do not import: it only holds the pickled state."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):  # NEWOBJ may pass constructor args; they are kept as data
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state for {self._qualname}: {type(state).__name__}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<stand-in {self._qualname}>"


_STANDIN_CLASSES: dict[str, type] = {}


def _standin(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STANDIN_CLASSES:
        _STANDIN_CLASSES[key] = type(name, (StandIn,), {"_qualname": key, "__module__": __name__})
    return _STANDIN_CLASSES[key]


# Globals a tensor-only pickle legitimately needs. Nothing here can run a shell or import arbitrary code.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "float"): float,
    ("builtins", "int"): int,
    ("builtins", "complex"): complex,
    ("datetime", "datetime"): __import__("datetime").datetime,
    ("datetime", "date"): __import__("datetime").date,
}
for _fn in ("_rebuild_parameter_with_state", "_rebuild_tensor_v3"):
    if hasattr(torch._utils, _fn):
        _ALLOWED[("torch._utils", _fn)] = getattr(torch._utils, _fn)
for _dt in ("float16", "float32", "float64", "bfloat16", "int64", "int32", "int8", "uint8", "bool"):
    _ALLOWED[("torch", _dt)] = getattr(torch, _dt)

HOW_TO_CONVERT = (
    "To convert it safely, load it once where its own code lives and you trust the file, then save only the "
    "weights, e.g. in the yolov5 repo: `python -c \"import torch; m = torch.load('best.pt', weights_only=False)"
    "['model']; torch.save(m.float().state_dict(), 'best_state_dict.pt')\"`, and pass that file to --weights."
)


def _restricted_unpickler(standin_prefixes: tuple[str, ...], extra: dict[tuple[str, str], Any]):
    allowed = {**_ALLOWED, **extra}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 (Python 2) spelling
            if (module, name) in allowed:
                return allowed[(module, name)]
            if module == "torch" and name.endswith("Storage"):  # legacy typed storages (torch.HalfStorage, ...)
                return getattr(torch, name)
            if any(module == p or module.startswith(p + ".") for p in standin_prefixes):
                return _standin(module, name)
            raise UnsafePickleError(
                f"refused to load `{module}.{name}` from the pickle: it is not on the allow-list of tensor and "
                f"model-container classes, and unpickling it could run code from the file. {HOW_TO_CONVERT}"
            )

    return RestrictedUnpickler


def restricted_load(
    path: str | os.PathLike,
    standin_prefixes: Iterable[str] = (),
    allow: dict[tuple[str, str], Any] | None = None,
) -> Any:
    """`torch.load` through an allow-list unpickler (see the module docstring). `allow` adds exact globals
    ((module, name) -> object) that are safe to call; `standin_prefixes` names module trees read as inert data."""
    unpickler = _restricted_unpickler(tuple(standin_prefixes), dict(allow or {}))
    pickle_module = types.SimpleNamespace(Unpickler=unpickler, load=lambda f, **kw: unpickler(f, **kw).load(),
                                          __name__="edgedeploy_restricted_pickle")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)
    except UnsafePickleError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def is_standin(obj: Any, qualname_prefix: str = "") -> bool:
    return isinstance(obj, StandIn) and obj._qualname.startswith(qualname_prefix)


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The flat state dict of a stand-in module tree (parameters and persistent buffers, `nn.Module` order)."""
    if not isinstance(obj, StandIn):
        raise CheckpointError(f"expected a pickled module at {prefix or 'the root'}, found {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    params = obj.__dict__.get("_parameters") or {}
    buffers = obj.__dict__.get("_buffers") or {}
    skip = set(obj.__dict__.get("_non_persistent_buffers_set") or ())
    for name, t in list(params.items()) + [(n, b) for n, b in buffers.items() if n not in skip]:
        if t is not None:
            out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else t
    for name, child in (obj.__dict__.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out
