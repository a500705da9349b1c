"""Per test case: each method's mean Dice over the missing-modality subsets, and paired differences.

A thin wrapper kept for old instructions: the logic lives in :mod:`nnunet_gmd.demo.per_case` and
:mod:`nnunet_gmd.demo.paired`; this is ``nnunet-gmd benchmark stats RUN`` (which writes
``paired_differences.{md,csv,json,png}`` into RUN, or into ``-o``).

    python benchmarks/per_case.py benchmark_output [-o folder] [--methods stock ds gmd]
"""
from __future__ import annotations

import sys

from nnunet_gmd.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", "stats", *sys.argv[1:]]))
