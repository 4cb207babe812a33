"""Helpers shared by the classifier converters (timm, ml-cvnets, Megvii ShuffleNet-Series).

- `tensor_dict`: the state dict inside a checkpoint object, if it is one;
- `rename`: apply ordered regex rename rules to every key, values untouched;
- `identify_variant`: which registered variant of a family the renamed tensors are, by building each candidate on
  the meta device (no memory, no init cost) and comparing every key and shape;
- `finish`: check the requested model against the identified variant and raise a message naming the right one.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import torch

from edgedeploy.errors import CheckpointError
from edgedeploy.models.official import Converted


def tensor_dict(obj: Any, wrappers: Iterable[str] = ()) -> dict[str, torch.Tensor] | None:
    """`obj` itself if it maps names to tensors, else the first of `wrappers` that does; `module.` is stripped."""
    if not isinstance(obj, Mapping):
        return None
    candidates = [obj.get(w) for w in wrappers] + [obj]
    for sd in candidates:
        if isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            sd = dict(sd)
            if all(k.startswith("module.") for k in sd):  # DataParallel / DDP
                sd = {k[len("module.") :]: v for k, v in sd.items()}
            return sd
    return None


def rename(sd: Mapping[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply every (regex, replacement) rule in order to each key; floating values become float32 (exact)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        out[new] = value.float() if value.is_floating_point() else value
    return out


def _family_variants(family: str) -> list[str]:
    from edgedeploy.models.registry import get_model_info, list_models

    return [n for n in list_models() if get_model_info(n).family == family]


def _shape_mismatches(sd: Mapping[str, torch.Tensor], name: str, num_classes: int, kwargs: dict) -> list[str]:
    from edgedeploy.models.registry import get_model_info

    with torch.device("meta"):
        model = get_model_info(name).builder(num_classes=num_classes, **kwargs)
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    problems += [f"unexpected {k}" for k in sd if k not in own]
    problems += [
        f"{k}: {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in {name}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    return problems


def identify_variant(
    sd: dict[str, torch.Tensor], family: str, head_key: str, kwargs: dict, requested: str, source: str
) -> str:
    """The registered variant of `family` whose keys and shapes all match `sd` (any class count).

    Missing `num_batches_tracked` buffers (they do not affect inference) are filled with 0 in `sd`.
    Raises CheckpointError with the first mismatches against the requested model when none matches.
    """
    from edgedeploy.models.registry import get_model_info

    num_classes = int(sd[head_key].shape[0]) if head_key in sd else 1000
    try:
        wanted = get_model_info(requested).name
    except Exception:  # an unknown name: the caller's own lookup reports it
        wanted = requested
    variants = _family_variants(family)
    ordered = ([wanted] if wanted in variants else []) + [v for v in variants if v != wanted]
    for name in ordered:
        if not _shape_mismatches(sd, name, num_classes, kwargs):
            with torch.device("meta"):
                own = get_model_info(name).builder(num_classes=num_classes, **kwargs).state_dict()
            for k in own:
                if k.endswith("num_batches_tracked") and k not in sd:
                    sd[k] = torch.zeros((), dtype=torch.long)
            return name
    probe = wanted if wanted in variants else (variants[0] if variants else None)
    detail = _shape_mismatches(sd, probe, num_classes, kwargs)[:6] if probe else []
    raise CheckpointError(
        f"{source} checkpoint recognised ({family} layout), but its shapes match no registered {family} variant "
        f"({', '.join(variants)}). First differences against {probe}:\n  " + "\n  ".join(detail)
    )


def with_num_classes(kwargs: dict, sd: Mapping[str, torch.Tensor], head_key: str) -> dict:
    """`kwargs` plus the class count of the head the file carries (the model is built with it, and the export
    records it: an ImageNet file gives 1000, a fine-tuned one its own)."""
    return {**kwargs, "num_classes": int(sd[head_key].shape[0])}


def finish(converted: Converted, requested: str) -> Converted:
    """Raise if the checkpoint is another variant than the one asked for, naming the one it is."""
    from edgedeploy.models.registry import get_model_info

    try:
        wanted = get_model_info(requested).name
    except Exception:
        return converted  # the caller's lookup reports the unknown name
    if converted.variant is not None and converted.variant != wanted:
        raise CheckpointError(
            f"this is a {converted.variant} checkpoint ({converted.source}), not {wanted}: "
            f"use `--model {converted.variant}` (API: create_model({converted.variant!r}, weights=...))."
        )
    return converted
