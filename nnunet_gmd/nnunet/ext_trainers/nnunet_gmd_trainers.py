"""Shim for ``nnUNet_extTrainer``: nnU-Net searches this folder and finds our trainer classes here."""
from nnunet_gmd.nnunet.baselines import *  # noqa: F401,F403
from nnunet_gmd.nnunet.trainers import *  # noqa: F401,F403
