"""export_report.json: every step with its status, time, key figure and details, plus the reuse keys."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import EXIT_ENGINE_SKIPPED, EXIT_OK
from edgedeploy.io import atomic_write_json

REPORT_NAME = "export_report.json"
REPORT_VERSION = 1


@dataclass
class Step:
    name: str
    status: str  # "ok" | "reused" | "failed" | "skipped"
    time_s: float = 0.0
    figure: str = ""  # one short line for the table
    details: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # hash of the inputs that produced this step's artifacts (for reuse)
    artifacts: list[str] = field(default_factory=list)  # file names relative to the output folder


@dataclass
class ExportReport:
    model: str
    task: str
    out_dir: str
    imgsz: int
    options: dict[str, Any]
    environment: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # label -> file name
    engine_skipped: bool = False
    engine_skip_reason: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    report_version: int = REPORT_VERSION

    @property
    def exit_code(self) -> int:
        return EXIT_ENGINE_SKIPPED if self.engine_skipped else EXIT_OK

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def add(self, step: Step) -> Step:
        self.steps = [s for s in self.steps if s.name != step.name] + [step]
        return step

    def table(self) -> str:
        rows = [f"{'step':<22}{'status':<9}{'time':>8}  figure"]
        for s in self.steps:
            rows.append(f"{s.name:<22}{s.status:<9}{s.time_s:>7.1f}s  {s.figure}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self) -> Path:
        return atomic_write_json(Path(self.out_dir) / REPORT_NAME, self.to_dict())


def load_report(out_dir: str | Path) -> ExportReport | None:
    """The previous run's report in `out_dir`, or None when absent or unreadable (then nothing is reused)."""
    p = Path(out_dir) / REPORT_NAME
    try:
        d = json.loads(p.read_text())
        if d.get("report_version") != REPORT_VERSION:
            return None
        steps = [Step(**s) for s in d.pop("steps", [])]
        return ExportReport(**{**d, "steps": steps})
    except (OSError, ValueError, TypeError):
        return None
