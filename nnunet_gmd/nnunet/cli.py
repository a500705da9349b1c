"""``nnunet-gmd`` sub-commands of the nnU-Net integration."""
from __future__ import annotations

import argparse

from nnunet_gmd.nnunet import ext_trainer_path


def _ext_path(args: argparse.Namespace) -> int:
    print(ext_trainer_path())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ext-path", help="print the folder to put in nnUNet_extTrainer "
                                        "(export nnUNet_extTrainer=$(nnunet-gmd ext-path))")
    p.set_defaults(func=_ext_path)
