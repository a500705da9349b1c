"""nnU-Net's own preprocessing, sliding window and export inside a MONAI bundle (``nnunet-gmd export-bundle``).

A bundle exported from an nnU-Net model must segment a case exactly as ``nnunet-gmd predict`` does. Re-creating
nnU-Net's pipeline with MONAI transforms (Spacingd, CropForegroundd, NormalizeIntensityd, Invertd) would only
approximate it: nnU-Net transposes axes, crops to the nonzero box of all channels *before* resampling, normalises
per channel with the plan's scheme (z-score, CT clipping with dataset statistics, ...), resamples anisotropic
data with its own separate-z rule, places sliding windows on its own grid and resamples logits back before
thresholding. So these MONAI components call nnU-Net's functions instead, driven by the model's
``plans.json``/``dataset.json`` shipped in the bundle:

* :class:`NnUNetPlan` — the plan, with the values the bundle config shows (spacing, patch size as ``roi_size``,
  normalisation per channel) applied on top, so editing them in ``inference.json`` takes effect.
* :class:`NnUNetPreprocessd` — read the present channel files with the plan's reader, zero-fill absent channels
  (as ``nnunet-gmd predict`` does), run ``DefaultPreprocessor.run_case_npy`` (transpose, nonzero crop,
  normalisation, resampling) and record the availability mask.
* :class:`NnUNetSlidingWindowInferer` — ``nnUNetPredictor``'s sliding window (Gaussian weights, tile step,
  mirroring axes of the checkpoint) around the bundle's network, with the mask bound per case.
* :class:`NnUNetSaveSegmentationd` — nnU-Net's logits-to-segmentation export (resample back, nonlinearity,
  regions/labels, undo crop and transpose) and its writer: ``<output_dir>/<case><file_ending>``.
"""
from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import nn

from nnunet_gmd.atomic import atomic_path
from nnunet_gmd.errors import UserError
from nnunet_gmd.monai.data import CASE_KEY

PROPERTIES_KEY = "nnunet_properties"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the case properties")


class NnUNetPlan:
    """An nnU-Net plan (plans.json + dataset.json + configuration) with the bundle's overrides applied.

    Args:
        plans_file, dataset_json_file: the model's ``plans.json`` and ``dataset.json``.
        configuration: e.g. ``"3d_fullres"``.
        spacing, patch_size, normalization_schemes, use_mask_for_norm: replace the configuration's values when
            given (the exported ``inference.json`` passes the plan's own values, so they are visible there).
    """

    def __init__(self, plans_file: str | os.PathLike, dataset_json_file: str | os.PathLike, configuration: str,
                 spacing: Optional[Sequence[float]] = None, patch_size: Optional[Sequence[int]] = None,
                 normalization_schemes: Optional[Sequence[str]] = None,
                 use_mask_for_norm: Optional[Sequence[bool]] = None) -> None:
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

        self.dataset_json = _read_json(dataset_json_file)
        self.plans_manager = PlansManager(_read_json(plans_file))
        try:
            base = self.plans_manager.get_configuration(configuration)
        except RuntimeError as e:
            raise UserError(f"{plans_file}: {e}") from None
        config = deepcopy(base.configuration)
        dims = len(config["patch_size"])
        for key, value, n in (("spacing", spacing, dims), ("patch_size", patch_size, dims),
                              ("normalization_schemes", normalization_schemes, self.num_channels),
                              ("use_mask_for_norm", use_mask_for_norm, self.num_channels)):
            if value is None:
                continue
            value = list(value)
            if len(value) != n:
                raise UserError(f"{key} needs {n} entries for configuration {configuration}, got {value}")
            config[key] = value
        self.configuration_name = configuration
        self.configuration_manager = ConfigurationManager(config)
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]


def _read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


class NnUNetPreprocessd(MapTransform):
    """Case dict with one file per present channel -> ``image`` (C, *spatial) preprocessed exactly as nnU-Net.

    ``keys`` are the channel keys in the plan's channel order. Absent channels are zero images on the case's
    grid, as ``nnunet-gmd predict`` writes them; ``available`` (C,) bool records which channels are present so
    the Dynamic Sharing network switches the others off. The nnU-Net properties needed to write the result back
    on the input geometry travel as a JSON string under ``nnunet_properties`` (strings collate unchanged).
    """

    def __init__(self, keys: KeysCollection, plan: NnUNetPlan, image_key: str = "image",
                 mask_key: str = "available", properties_key: str = PROPERTIES_KEY, case_key: str = CASE_KEY) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if len(self.keys) != plan.num_channels:
            raise UserError(f"{len(self.keys)} channel keys ({', '.join(map(str, self.keys))}) for a plan with "
                            f"{plan.num_channels} channels")
        self.plan = plan
        self.image_key, self.mask_key = image_key, mask_key
        self.properties_key, self.case_key = properties_key, case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from nnunet_gmd.nnunet.cases import CaseFiles, check_case

        d = dict(data)
        case = str(d.get(self.case_key, "<unnamed case>"))
        present = {i: Path(d[k]) for i, k in enumerate(self.keys) if d.get(k)}
        if not present:
            raise UserError(f"case {case!r}: none of the channels {', '.join(map(str, self.keys))} is present")
        pm, cm = self.plan.plans_manager, self.plan.configuration_manager
        reader = pm.image_reader_writer_class()
        check_case(CaseFiles(case, present), reader)  # one-line errors for broken or mismatched files
        images, properties = reader.read_images([str(present[i]) for i in sorted(present)])
        raw = np.zeros((self.plan.num_channels, *images.shape[1:]), dtype=np.float32)
        raw[sorted(present)] = images
        preprocessor = cm.preprocessor_class(verbose=False)
        image, _, properties = preprocessor.run_case_npy(raw, None, properties, pm, cm, self.plan.dataset_json)
        d[self.image_key] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        d[self.mask_key] = torch.tensor([i in present for i in range(self.plan.num_channels)], dtype=torch.bool)
        d[self.properties_key] = json.dumps(properties, default=_json_default)
        return d


class _MaskBound(nn.Module):
    """The network with one case's availability mask bound (nnU-Net's predictor calls ``network(x)``)."""

    def __init__(self, network: nn.Module, available: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.network = network
        self.available = available

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.available is None:
            return self.network(x)
        return self.network(x, self.available)


class NnUNetSlidingWindowInferer(Inferer):
    """nnU-Net's sliding-window prediction (``nnUNetPredictor``) as a MONAI inferer.

    The window is the plan's patch size (the bundle's ``roi_size``), the step ``tile_step_size`` of it, Gaussian
    weighting and test-time mirroring over ``mirror_axes`` as in nnU-Net. ``available`` ((C,) or (B, C) bool) is
    handed to the network per case. Returns logits of the input's spatial shape, in nnU-Net's float16 accumulation.
    """

    def __init__(self, plan: NnUNetPlan, tile_step_size: float = 0.5, use_gaussian: bool = True,
                 mirror_axes: Optional[Sequence[int]] = None, perform_everything_on_device: bool = True,
                 trainer_name: str = "") -> None:
        if not 0 < tile_step_size <= 1:
            raise UserError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
        self.plan = plan
        self.tile_step_size = tile_step_size
        self.use_gaussian = use_gaussian
        self.mirror_axes = tuple(mirror_axes) if mirror_axes else None
        self.perform_everything_on_device = perform_everything_on_device
        self.trainer_name = trainer_name

    def _predictor(self, network: nn.Module, device: torch.device):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(tile_step_size=self.tile_step_size, use_gaussian=self.use_gaussian,
                                    use_mirroring=self.mirror_axes is not None,
                                    perform_everything_on_device=self.perform_everything_on_device, device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(network, self.plan.plans_manager, self.plan.configuration_manager, None,
                                        self.plan.dataset_json, self.trainer_name, self.mirror_axes)
        return predictor

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any,
                 available: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        if available is not None:
            available = torch.as_tensor(available, dtype=torch.bool, device=inputs.device)
            if available.dim() == 1:
                available = available.expand(inputs.shape[0], -1)
        outputs = []
        for b in range(inputs.shape[0]):
            predictor = self._predictor(_MaskBound(network, None if available is None else available[b]),
                                        inputs.device)
            outputs.append(predictor.predict_sliding_window_return_logits(inputs[b]))
        return torch.stack(outputs)


class NnUNetSaveSegmentationd(MapTransform):
    """Logits (heads, *spatial) -> nnU-Net's segmentation on the input grid, written as ``<case><file_ending>``.

    Uses ``convert_predicted_logits_to_segmentation_with_correct_shape`` and the plan's image writer, as
    ``nnUNetv2_predict``'s export. The written labels are the nnU-Net dataset's values. ``keys`` gets the label
    map (uint8 tensor); the file is written through a temporary name, then renamed.
    """

    def __init__(self, keys: KeysCollection, plan: NnUNetPlan, output_dir: str | os.PathLike,
                 properties_key: str = PROPERTIES_KEY, case_key: str = CASE_KEY) -> None:
        super().__init__(keys)
        self.plan = plan
        self.output_dir = Path(output_dir)
        self.properties_key, self.case_key = properties_key, case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        d = dict(data)
        properties = json.loads(d[self.properties_key])
        case = str(d[self.case_key])
        for key in self.key_iterator(d):
            logits = torch.as_tensor(d[key]).detach().cpu()
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, self.plan.plans_manager, self.plan.configuration_manager, self.plan.label_manager,
                properties, num_threads_torch=torch.get_num_threads())
            self.write(seg, case, properties)
            d[key] = torch.from_numpy(np.asarray(seg))
        return d

    def write(self, seg: np.ndarray, case: str, properties: dict) -> Path:
        ending = self.plan.file_ending
        target = self.output_dir / f"{case}{ending}"
        with atomic_path(target, suffix=f".tmp{ending}") as tmp:   # the writer picks the format by ending
            self.plan.plans_manager.image_reader_writer_class().write_seg(seg, str(tmp), properties)
        return target
