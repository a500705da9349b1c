"""Dynamic Sharing networks (framework-free: torch only)."""
from nnunet_gmd.networks.ds_unet import DSNetworkBase, DSUNet, ModalityNorm
from nnunet_gmd.networks.ff_unet import FUSIONS, DSFeatureFusionUNet
from nnunet_gmd.networks.wrappers import only_available, unwrap

__all__ = ["DSNetworkBase", "DSUNet", "DSFeatureFusionUNet", "FUSIONS", "ModalityNorm", "only_available", "unwrap"]
