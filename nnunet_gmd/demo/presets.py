"""Named run settings: resolution, network size, training budget and inference options, kept in one place.

A preset is what makes the same pipeline fit a 2-core CPU (a coarser target spacing and a narrower network,
both set through nnU-Net's own plans mechanism) or run at full nnU-Net settings on a GPU. Every method of a
run trains under the same :class:`Budget`, passed to the trainers through the ``NNUNET_GMD_*`` variables.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class Budget:
    """Training length, identical for every method of a run (nnU-Net's default is 1000 x 250, 50 val)."""

    epochs: int
    iterations_per_epoch: int
    val_iterations: int

    def env(self) -> dict[str, str]:
        return {"NNUNET_GMD_NUM_EPOCHS": str(self.epochs),
                "NNUNET_GMD_ITERS_PER_EPOCH": str(self.iterations_per_epoch),
                "NNUNET_GMD_VAL_ITERS": str(self.val_iterations)}

    def describe(self) -> str:
        return (f"{self.epochs} epochs x {self.iterations_per_epoch} iterations "
                f"(= {self.epochs * self.iterations_per_epoch} training steps per method)")


@dataclass(frozen=True)
class Preset:
    """How to plan, train and evaluate. ``None`` fields keep nnU-Net's own choice."""

    name: str
    budget: Budget
    plans_name: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    target_spacing_mm: Optional[float] = None     # isotropic; nnU-Net's -overwrite_target_spacing
    gpu_memory_target_gb: Optional[float] = None  # nnU-Net's -gpu_memory_target: bounds the patch size
    base_features: Optional[int] = None            # width of the first stage; later stages double it ...
    max_features: Optional[int] = None             # ... up to this cap (nnU-Net: 32 and 320)
    tta: bool = True                               # mirroring test-time augmentation in evaluation
    hd95: bool = True
    cpu_friendly: bool = False                     # no worker processes (2-core machines)

    @property
    def derived_configuration(self) -> Optional[str]:
        """The plans configuration we add (inheriting from 3d_fullres) when the network is made narrower."""
        return self.configuration if self.base_features is not None else None

    def with_budget(self, epochs: Optional[int] = None, iterations: Optional[int] = None,
                    val_iterations: Optional[int] = None) -> "Preset":
        b = self.budget
        return replace(self, budget=Budget(epochs or b.epochs, iterations or b.iterations_per_epoch,
                                           val_iterations or b.val_iterations))

    def describe(self) -> str:
        parts = [f"preset {self.name}"]
        parts.append(f"{self.target_spacing_mm:g} mm isotropic" if self.target_spacing_mm
                     else "nnU-Net's target spacing")
        if self.base_features:
            parts.append(f"U-Net features {self.base_features}..{self.max_features}")
        parts.append(self.budget.describe())
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


# Reduced CPU settings (plans "nnUNetPlans_cpu", configuration "3d_small"). The memory target is what nnU-Net's
# planner sizes the patch by (for its default width): 0.15 GB gives 32 x 40 x 32 voxels on BraTS at 3 mm, about
# 96 x 120 x 96 mm; the phantoms fit into one patch at 1 GB.
_CPU = dict(plans_name="nnUNetPlans_cpu", configuration="3d_small", base_features=16, max_features=128, tta=False,
            hd95=False, cpu_friendly=True)

PRESETS: dict[str, Preset] = {
    # The demo: phantoms at their native 1 mm, a narrow network, 384 steps per method: 6.9 min on a 2-core CPU with
    # GMD k=5 on the feature-fusion network, its training 4.7 of them (exact logit GMD took 34.7 min on a slower day).
    "demo": Preset("demo", Budget(16, 24, 2), target_spacing_mm=1.0, gpu_memory_target_gb=1.0, **_CPU),
    # Tiny end-to-end check (CI): the pipeline runs, nothing is learned.
    "smoke": Preset("smoke", Budget(1, 2, 1), target_spacing_mm=3.0, gpu_memory_target_gb=0.15, **_CPU),
    # Real BraTS on an idle 2-core CPU in about an hour: 3 mm, narrow network, 1000 steps per method. Idle-machine
    # seconds per step (120-step run): stock 0.2, dropout 0.23, DS 0.4, GMD 1.55, GMD k=5 0.65; exact GMD takes
    # about half of the time.
    "cpu": Preset("cpu", Budget(40, 25, 2), target_spacing_mm=3.0, gpu_memory_target_gb=0.15, **_CPU),
    # Full nnU-Net settings (GPU): default plans, 1000 x 250 training, mirroring TTA, HD95.
    "full": Preset("full", Budget(1000, 250, 50)),
}
