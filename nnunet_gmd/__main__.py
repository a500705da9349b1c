"""``python -m nnunet_gmd ...`` is the ``nnunet-gmd`` command."""
import sys

from nnunet_gmd.cli import main

sys.exit(main())
