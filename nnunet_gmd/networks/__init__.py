"""Dynamic Sharing networks (framework-free: torch only)."""
from nnunet_gmd.networks.ds_unet import DSUNet, ModalityNorm

__all__ = ["DSUNet", "ModalityNorm"]
