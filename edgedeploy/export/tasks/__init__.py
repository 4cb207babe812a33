"""Task adapters: everything in the export pipeline that differs between classify / detect / segment."""

from edgedeploy.export.tasks.base import (
    EvalData,
    OutputParity,
    ParityResult,
    TaskAdapter,
    get_task_adapter,
    register_task,
)

__all__ = ["EvalData", "OutputParity", "ParityResult", "TaskAdapter", "get_task_adapter", "register_task"]
