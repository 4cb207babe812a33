"""Task adapters: everything in the export pipeline that differs between classify / detect / segment."""

from edgedeploy.export.tasks.base import (
    EvalData,
    OutputParity,
    ParityResult,
    TaskAdapter,
    get_task_adapter,
)

__all__ = ["EvalData", "OutputParity", "ParityResult", "TaskAdapter", "get_task_adapter"]
