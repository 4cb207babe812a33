"""Where built-in synthetic datasets are written: one folder per generator and parameter set."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def synthetic_root(kind: str, params: dict) -> Path:
    """`$EDGEDEPLOY_DATA` (default ~/.cache/edgedeploy/datasets) / synthetic-<kind>-<hash of params>."""
    base = Path(os.environ.get("EDGEDEPLOY_DATA", Path.home() / ".cache" / "edgedeploy" / "datasets"))
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return base / f"synthetic-{kind}-{digest}"
