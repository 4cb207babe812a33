"""Errors a user can act on. The CLI prints their message (no traceback) and exits with `exit_code`."""

from __future__ import annotations

# Exit codes shared by every command, so scripts can branch on them.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ENGINE_SKIPPED = 3  # export finished, but no TensorRT builder was available
EXIT_PARITY_FAILED = 4  # an exported artifact disagrees with PyTorch
EXIT_INTERRUPTED = 130


class EdgeDeployError(Exception):
    """Base class: a problem with the user's input or environment, with a message saying what to do."""

    exit_code = EXIT_ERROR


class UnknownModelError(EdgeDeployError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(EdgeDeployError):
    """A checkpoint that is not a state dict, or whose keys/shapes do not match the model."""


class DatasetError(EdgeDeployError):
    """A dataset directory that is missing, empty, or malformed."""


class InputError(EdgeDeployError):
    """An input (image, frame, tensor) of the wrong size, channel count or dtype."""


class ExportError(EdgeDeployError):
    """torch -> ONNX export, simplification or quantization failed."""


class ParityError(EdgeDeployError):
    """An exported artifact's outputs disagree with PyTorch beyond the stated tolerance."""

    exit_code = EXIT_PARITY_FAILED


class InsensitiveProofError(ParityError):
    """The parity proof's outputs hardly depend on the input, so agreement within atol would prove nothing."""


class RuntimeUnavailableError(EdgeDeployError):
    """An artifact that needs a runtime this machine lacks (e.g. a TensorRT engine without TensorRT and a GPU)."""

    exit_code = EXIT_ENGINE_SKIPPED


class BuilderUnavailableError(EdgeDeployError):
    """No TensorRT / TensorRT-RTX builder is importable."""

    exit_code = EXIT_ENGINE_SKIPPED


class EngineBuildError(EdgeDeployError):
    """The TensorRT parser or builder rejected the network; the message carries its log."""


class EngineCompatibilityError(EdgeDeployError):
    """An engine built for another TensorRT version or GPU: it must be rebuilt on this machine."""


class SourceError(EdgeDeployError):
    """A video/camera source that cannot be opened or that dropped."""
