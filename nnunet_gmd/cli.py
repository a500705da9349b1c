"""``nnunet-gmd``: one entry point whose sub-commands live next to the code they drive.

Each feature module exposes ``register(subparsers)``, adding its sub-commands with ``set_defaults(func=...)``.
Expected user errors (bad input files, unknown modality names, ...) are raised as
:class:`nnunet_gmd.errors.UserError` and
printed as one clear line, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from nnunet_gmd.errors import UserError

# Modules that contribute sub-commands. A module that cannot be imported (an optional integration whose
# dependency is absent) is reported only when one of its commands is asked for.
COMMAND_MODULES = (
    "nnunet_gmd.bench_cli",
    "nnunet_gmd.nnunet.cli",
    "nnunet_gmd.sentiment.cli",
    "nnunet_gmd.demo.cli",
)


DESCRIPTION = ("One segmentation model for any subset of MRI sequences, for nnU-Net v2 and MONAI: Dynamic Sharing "
               "networks trained with Gradient-Guided Modality Decoupling (GMD, AAAI 2024), missing-modality "
               "prediction and a per-subset robustness report.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnunet-gmd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-gmd", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"nnunet-gmd {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the module itself is not there (yet)
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"nnunet-gmd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
