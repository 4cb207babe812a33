"""`deploy models`: every registered variant with our parameter/MAC counts next to the published figures.

Counting ~40 models (EfficientNet-B7 at 600 px included) takes a while, so results are cached in
`~/.cache/edgedeploy/model_stats.json` (or `$EDGEDEPLOY_CACHE_DIR`), keyed by model name, input size and a
hash of the model's source file, the package and torch versions: editing a model file recounts only that file's
models. MACs are counted on the meta device (shapes only, no arithmetic) and fall back to a real CPU forward for
models whose forward needs real values.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

CACHE_FILE = "model_stats.json"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("classify", "detect", "segment"), help="only models for this task")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.add_argument("--no-cache", action="store_true", help="recount every model, ignoring the cache")


def cache_path() -> Path:
    root = (
        os.environ.get("EDGEDEPLOY_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgedeploy"
    )
    return Path(root) / CACHE_FILE


def _source_files(builder) -> list[str]:
    """The builder's own file plus the edgedeploy modules it uses directly (shared blocks, detection heads)."""
    module = sys.modules.get(getattr(builder, "__module__", ""), None)
    files = set()
    if module is None:
        source = inspect.getsourcefile(builder)
        return [source] if source else []
    for obj in [module, *vars(module).values()]:
        owner = obj if inspect.ismodule(obj) else sys.modules.get(getattr(obj, "__module__", None) or "", None)
        if owner is not None and owner.__name__.startswith("edgedeploy.") and getattr(owner, "__file__", None):
            files.add(owner.__file__)
    return sorted(files)


def code_version(info) -> str:
    """Hash of what determines a model's counts: its source files and the package, torch and torchvision versions."""
    import torch
    import torchvision

    from edgedeploy.version import __version__

    builder = getattr(info.builder, "func", info.builder)
    h = hashlib.sha256(f"{__version__}|{torch.__version__}|{torchvision.__version__}".encode())
    for path in _source_files(builder):
        try:
            h.update(Path(path).read_bytes())
        except OSError:
            h.update(path.encode())
    return h.hexdigest()[:16]


def count_model(name: str, imgsz: int | None = None) -> dict[str, int]:
    """Params and MACs of a registered model at `imgsz` (default: its published size)."""
    import torch

    from edgedeploy.models import create_model
    from edgedeploy.models.artifact import describe_artifact
    from edgedeploy.models.complexity import count_macs, count_params

    desc = describe_artifact(model=name, imgsz=imgsz)
    info, size = desc.info, desc.imgsz
    try:
        with torch.device("meta"):
            model = create_model(info.name)
        macs = count_macs(model, size)
    except Exception:  # a forward that needs real values (e.g. `.item()`, CPU-created anchors): count for real
        model = create_model(info.name)
        macs = count_macs(model, size)
    return {"params": count_params(model), "macs": int(macs), "imgsz": size}


def _delta(ours: float | None, published: float | None) -> float | None:
    return None if not ours or not published else 100.0 * (ours - published) / published


def collect_stats(task: str | None = None, use_cache: bool = True, progress: bool = True) -> list[dict[str, Any]]:
    """One row per registered variant: our counts, published figures and deltas (percent)."""
    from tqdm import tqdm

    from edgedeploy.io import atomic_write_json
    from edgedeploy.models.registry import get_model_info, list_aliases, list_models

    path = cache_path()
    cache: dict[str, Any] = {}
    if use_cache and path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}  # a corrupt cache is only a cache
    aliases: dict[str, list[str]] = {}
    for alias, target in list_aliases().items():
        aliases.setdefault(target, []).append(alias)

    rows, dirty = [], False
    names = list_models(task)
    for name in tqdm(names, desc="counting params/MACs", unit="model", disable=not progress, file=sys.stderr):
        info = get_model_info(name)
        key, version = f"{name}@{info.imgsz}", code_version(info)
        entry = cache.get(key)
        if not entry or entry.get("version") != version:
            try:
                entry = {**count_model(name), "version": version}
            except Exception as e:  # one broken model must not hide the rest of the zoo
                print(f"warning: could not count {name}: {type(e).__name__}: {e}", file=sys.stderr)
                entry = {"params": None, "macs": None, "error": f"{type(e).__name__}: {e}"}
            else:
                cache[key] = entry
                dirty = True
        rows.append(
            {
                "name": name,
                "aliases": sorted(aliases.get(name, [])),
                "task": info.task,
                "family": info.family,
                "imgsz": info.imgsz,
                "params": entry["params"],
                "macs": entry["macs"],
                "published_params": info.published_params,
                "published_macs": info.published_macs,
                "params_delta_pct": _delta(entry["params"], info.published_params),
                "macs_delta_pct": _delta(entry["macs"], info.published_macs),
                "source": info.source,
                **({"error": entry["error"]} if "error" in entry else {}),
            }
        )
    if dirty:
        try:
            atomic_write_json(path, cache)
        except OSError as e:  # read-only home: still answer, just slower next time
            print(f"warning: could not write the stats cache {path}: {e}", file=sys.stderr)
    return rows


def _fmt(value: float | None, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _fmt_delta(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "task", "imgsz", "params M", "pub M", "Δ", "MACs G", "pub G", "Δ")
    table = [header] + [
        (
            r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else ""),
            r["task"],
            str(r["imgsz"]),
            _fmt(r["params"], 1e6, 3),
            _fmt(r["published_params"], 1e6, 2),
            _fmt_delta(r["params_delta_pct"]),
            _fmt(r["macs"], 1e9, 3),
            _fmt(r["published_macs"], 1e9, 3),
            _fmt_delta(r["macs_delta_pct"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for j, row in enumerate(table):
        cells = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = collect_stats(task=args.task, use_cache=not args.no_cache, progress=not args.json)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} models. MACs counted with torch FlopCounterMode at each model's default input size.")
    return 0
