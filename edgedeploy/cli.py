"""`deploy` command line. Each sub-command lives in its own room and is imported only when used."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from edgedeploy.version import __version__
from edgedeploy.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, EdgeDeployError

# name -> (module exposing `configure(parser)` and `run(args) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("edgedeploy.models.cli", "list every model variant with parameters and MACs"),
    "profile": ("edgedeploy.benchmarks.profile_cli", "parameters, MACs, per-layer table, peak activation memory"),
    "train": ("edgedeploy.train.cli", "train a model on an ImageFolder/YOLO/VOC dataset or `synthetic`"),
    "eval": ("edgedeploy.eval.cli", "evaluate a checkpoint, ONNX file or engine with the same code"),
    "export": ("edgedeploy.export.cli", "PyTorch -> ONNX (parity-proved) -> FP16/INT8 -> TensorRT engines"),
    "verify": ("edgedeploy.export.verify", "re-prove an exported ONNX (or engine) against its PyTorch model"),
    "bench": ("edgedeploy.benchmarks.bench_cli", "trtexec-style latency/throughput report; --compare backends"),
    "run": ("edgedeploy.runtime.camera_cli", "run a model on a camera, video file or RTSP stream"),
    "demo": ("edgedeploy.demo", "the main job on synthetic data: train, export, prove parity, benchmark"),
    "doctor": ("edgedeploy.doctor", "what this machine can do, and what to install for the rest"),
    "triton": ("edgedeploy.engines.triton", "write a Triton Inference Server model repository"),
}


class _Parser(argparse.ArgumentParser):
    """A usage error is one short paragraph (the bad argument and where to look), not the whole usage text."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s options are configured (and its module imported) when given,
    so `deploy --help` and `deploy doctor` stay fast and do not pull in torch."""
    parser = _Parser(prog="deploy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgedeploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is not None and name != command:
            continue
        try:
            importlib.import_module(module).configure(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    if rc == EXIT_INTERRUPTED and argv is None:
        # Ctrl-C in the `deploy` process itself: every `finally`/`with` has already cleaned up; skip the
        # interpreter teardown (torch's takes 2+ s on a busy CPU machine) so the shell gets 130 at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    if getattr(args, "_missing", False):
        print(f"deploy {args.command}: not available in this build", file=sys.stderr)
        return EXIT_ERROR
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except EdgeDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: no partial artifacts were left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # a path we cannot read or write (permissions, full disk, a file where a folder goes)
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: cannot access{where}: {e.strerror or e}. Check the path and its permissions and free space",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
