"""nnunet-gmd: one segmentation model for any subset of MRI sequences.

Core (torch only): :mod:`nnunet_gmd.subsets`, :mod:`nnunet_gmd.gmd`, :mod:`nnunet_gmd.networks`.
Integrations: :mod:`nnunet_gmd.nnunet` (nnU-Net v2), ``monai_bundle/`` (MONAI), :mod:`nnunet_gmd.sentiment`.
"""
__version__ = "0.1.0"
