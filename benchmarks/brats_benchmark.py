#!/usr/bin/env python
"""Real-data BraTS benchmark: the same as ``nnunet-gmd benchmark brats`` (all options are passed through).

    python benchmarks/brats_benchmark.py --train TRAIN_DIR --test TEST_DIR [--preset cpu|full] [-o DIR]

The logic lives in :mod:`nnunet_gmd.demo.benchmark`, so the installed command and this script are one program.
"""
import sys

from nnunet_gmd.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", "brats", *sys.argv[1:]]))
