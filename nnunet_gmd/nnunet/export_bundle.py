"""``nnunet-gmd export-bundle``: a DS-family model trained by nnU-Net -> a complete MONAI bundle.

The bundle rebuilds the network the trainer built (the :class:`~nnunet_gmd.nnunet.network.NetworkSpec` recorded
by ``build_network_architecture``), loads the fold's weights from ``models/model.pt`` and runs nnU-Net's own
preprocessing, sliding window and export inside MONAI components (:mod:`nnunet_gmd.monai.nnunet_plan`), driven
by the model's ``plans.json``/``dataset.json`` copied into ``configs/nnunet/``. So ``monai.bundle run`` writes
what ``nnunet-gmd predict`` writes for the same files.

One fold per bundle: a MONAI bundle carries one network (``network_def``, ``models/model.pt``), which is what
``verify_net_in_out``, ``ckpt_export`` and MONAI Deploy/Label consume. A fold ensemble is refused with a message
that says how to deploy several folds (one bundle each) or a single model on all cases (fold ``all``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from nnunet_gmd.errors import UserError
from nnunet_gmd.atomic import write_text
from nnunet_gmd.nnunet.network import NetworkSpec, network_spec

BUNDLE_VERSION = "0.1.0"
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")
GMD_REFERENCE = ("Hao Wang, Shengda Luo, Guosheng Hu, Jianguo Zhang. Gradient-Guided Modality Decoupling for "
                 "Missing-Modality Robustness. Proceedings of the AAAI Conference on Artificial Intelligence "
                 "38(14):15483-15491 (2024).")
NNUNET_REFERENCE = ("Isensee, Jaeger, Kohl, Petersen, Maier-Hein. nnU-Net: a self-configuring method for deep "
                    "learning-based biomedical image segmentation. Nature Methods 18, 203-211 (2021).")
LICENSE_FILE = Path(__file__).resolve().parent / "bundle_files" / "APACHE-2.0.txt"


@dataclass
class SourceModel:
    """One fold of a trained nnU-Net model, with everything the bundle is written from."""

    folder: Path
    fold: int | str
    checkpoint: Path
    trainer: str
    configuration: str
    dataset_json: dict
    plans: dict
    spec: NetworkSpec
    weights: dict
    mirror_axes: Optional[list[int]]
    epoch: Optional[int]

    @property
    def channel_names(self) -> list[str]:
        names = self.dataset_json["channel_names"]
        return [str(names[k]) for k in sorted(names, key=int)]

    @property
    def channel_keys(self) -> list[str]:
        """Data keys and file-name suffixes: the channel names in lower case."""
        return [n.lower() for n in self.channel_names]


# ---------------------------------------------------------------------------------------------- loading
def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} does not exist; is {path.parent} a folder written by nnUNetv2_train?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def load_source(folder: Path, folds: Sequence[int | str], checkpoint_name: str = "checkpoint_final.pth",
                configuration: Optional[str] = None) -> SourceModel:
    """Check a model folder and build the trainer's network from it; every problem is a one-line UserError."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_gmd.nnunet.model import use_our_trainers

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist")
    if len(folds) != 1:
        raise UserError(f"-f {' '.join(map(str, folds))}: a MONAI bundle holds one network (models/model.pt), so "
                        f"export-bundle exports one fold; export each fold into its own bundle, or train fold 'all' "
                        f"(nnUNetv2_train ... all) for one model trained on every case")
    fold = folds[0]
    ckpt_path = folder / f"fold_{fold}" / checkpoint_name
    if not ckpt_path.is_file():
        have = sorted(str(p.relative_to(folder)) for p in folder.glob("fold_*/*.pth"))
        raise UserError(f"checkpoint {ckpt_path} does not exist (present: {', '.join(have) or 'none'})")
    dataset_json = _load_json(folder / "dataset.json")
    plans = _load_json(folder / "plans.json")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        trainer_name = ckpt["trainer_name"]
        weights = ckpt["network_weights"]
    except (KeyError, TypeError):
        raise UserError(f"{ckpt_path} is not an nnU-Net checkpoint (no trainer_name/network_weights)") from None
    except Exception as e:  # torch raises anything from RuntimeError to UnpicklingError on a damaged file
        raise UserError(f"cannot read {ckpt_path}: {' '.join(str(e).split())[:200]}") from None
    config_name = ckpt.get("init_args", {}).get("configuration") or configuration
    if configuration and config_name != configuration:
        raise UserError(f"{ckpt_path} was trained with configuration {config_name}, not -c {configuration}")
    pm = PlansManager(plans)
    try:
        cm = pm.get_configuration(config_name)
    except RuntimeError as e:
        raise UserError(f"{folder / 'plans.json'}: {e}") from None
    if cm.previous_stage_name is not None:
        raise UserError(f"{config_name} is a cascade stage (it takes the previous stage's segmentation as input); "
                        f"export-bundle supports full-resolution and 2d configurations")
    use_our_trainers()
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    if trainer_class is None:
        raise UserError(f"{ckpt_path} names trainer {trainer_name}, which nnU-Net cannot find (nnUNet_extTrainer)")
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer_class.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
    spec = network_spec(network)
    if spec is None or not hasattr(network, "set_default_available"):
        raise UserError(f"{trainer_name} ({folder}) builds a {type(network).__name__}, not a Dynamic Sharing "
                        f"network; export-bundle exports DS-family models (nnUNetTrainerGMD, nnUNetTrainerDS, ...)")
    try:
        network.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{ckpt_path}: the weights do not fit the network of the plans "
                        f"({str(e).splitlines()[0]})") from None
    mirror = ckpt.get("inference_allowed_mirroring_axes")
    return SourceModel(folder=folder, fold=fold, checkpoint=ckpt_path, trainer=trainer_name,
                       configuration=config_name, dataset_json=dataset_json, plans=plans, spec=spec,
                       weights={k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
                       mirror_axes=[int(a) for a in mirror] if mirror else None, epoch=ckpt.get("current_epoch"))


def check_channel_keys(source: SourceModel) -> None:
    keys = source.channel_keys
    if len(set(keys)) != len(keys):
        raise UserError(f"{source.folder / 'dataset.json'}: channel names {source.channel_names} are not unique in "
                        f"lower case, and the bundle names input files <case>_<channel name in lower case>")
    bad = [k for k in keys if not k or "/" in k or os.sep in k]
    if bad:
        raise UserError(f"{source.folder / 'dataset.json'}: channel names {bad} cannot be part of file names")


# ---------------------------------------------------------------------------------------------- configs
def _configuration(source: SourceModel):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(source.plans)
    return pm, pm.get_configuration(source.configuration), pm.get_label_manager(source.dataset_json)


def output_heads(source: SourceModel) -> list[dict[str, Any]]:
    """What each network output channel means, and the file value it becomes."""
    _, _, lm = _configuration(source)
    labels = source.dataset_json["labels"]
    by_value = {json.dumps(v if not isinstance(v, (list, tuple)) or len(v) != 1 else v[0]): n
                for n, v in labels.items()}
    if lm.has_regions:
        heads = []
        for region, value in zip(lm.foreground_regions, lm.regions_class_order):
            region = list(region) if isinstance(region, (list, tuple)) else [region]
            key = json.dumps(region if len(region) != 1 else region[0])
            heads.append({"name": by_value.get(key, f"region {region}"), "labels": region, "writes": int(value),
                          "activation": "sigmoid"})
        return heads
    return [{"name": by_value.get(json.dumps(v), f"label {v}"), "labels": [int(v)], "writes": int(v),
             "activation": "softmax"} for v in lm.all_labels]


def _total_strides(spec: NetworkSpec, dims: int) -> list[int]:
    total = [1] * dims
    for stride in spec.kwargs.get("strides") or []:
        stride = stride if isinstance(stride, (list, tuple)) else [stride] * dims
        total = [t * int(s) for t, s in zip(total, stride)]
    return total


def inference_config(source: SourceModel) -> dict[str, Any]:
    """``configs/inference.json``: the trainer's network, nnU-Net's preprocessing/sliding window/export."""
    pm, cm, _ = _configuration(source)
    plan_module = "nnunet_gmd.monai.nnunet_plan"
    return {
        "imports": sorted({"$import torch", *source.spec.imports()}),
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist_file": "",
        "datalist_key": "testing",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "channels": source.channel_keys,
        "nnunet_configuration": source.configuration,
        "plans_file": "$@bundle_root + '/configs/nnunet/plans.json'",
        "dataset_json_file": "$@bundle_root + '/configs/nnunet/dataset.json'",
        "spacing": list(cm.spacing),
        "roi_size": list(cm.patch_size),
        "normalization_schemes": list(cm.normalization_schemes),
        "use_mask_for_norm": [bool(v) for v in cm.use_mask_for_norm],
        "tile_step_size": 0.5,
        "use_gaussian": True,
        "use_mirroring": source.mirror_axes is not None,
        "mirror_axes": source.mirror_axes or [],
        "num_workers": 0,
        "network_def": source.spec.to_monai_config(),
        "network": "$@network_def.to(@device)",
        "plan": {
            "_desc_": "the model's nnU-Net plan; spacing, roi_size (the patch size) and the per-channel "
                      "normalisation shown above replace the plan's values",
            "_target_": f"{plan_module}.NnUNetPlan",
            "plans_file": "@plans_file",
            "dataset_json_file": "@dataset_json_file",
            "configuration": "@nnunet_configuration",
            "spacing": "@spacing",
            "patch_size": "@roi_size",
            "normalization_schemes": "@normalization_schemes",
            "use_mask_for_norm": "@use_mask_for_norm",
        },
        "datalist": {"_target_": "nnunet_gmd.monai.load_cases", "dataset_dir": "@dataset_dir",
                     "datalist_file": "@datalist_file", "key": "@datalist_key", "modalities": "@channels"},
        "preprocessing": {
            "_desc_": "nnU-Net's preprocessing of the plan: transpose, crop to the nonzero box of all channels, "
                      "per-channel normalisation, resampling to spacing; absent channels are zero images",
            "_target_": "Compose",
            "transforms": [{"_target_": f"{plan_module}.NnUNetPreprocessd", "keys": "@channels", "plan": "@plan"}],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": "@num_workers"},
        "inferer": {
            "_desc_": "nnU-Net's sliding window: roi_size windows, tile_step_size step, Gaussian weights, "
                      "mirroring over mirror_axes; the availability mask reaches the network per case",
            "_target_": f"{plan_module}.NnUNetSlidingWindowInferer",
            "plan": "@plan",
            "tile_step_size": "@tile_step_size",
            "use_gaussian": "@use_gaussian",
            "mirror_axes": "$@mirror_axes if @use_mirroring else None",
            "trainer_name": source.trainer,
        },
        "prepare_batch": {"_target_": "PrepareBatchExtraInput", "extra_keys": {"available": "available"}},
        "postprocessing": {
            "_desc_": "nnU-Net's export: logits back to the input grid, nonlinearity, labels; "
                      "writes output_dir/<case><file_ending>",
            "_target_": "Compose",
            "transforms": [{"_target_": f"{plan_module}.NnUNetSaveSegmentationd", "keys": "pred", "plan": "@plan",
                            "output_dir": "@output_dir"}],
        },
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "prepare_batch": "@prepare_batch",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "run_workflow": {"_target_": "nnunet_gmd.monai.io.run_workflow", "_mode_": "callable"},
        "run": ["$@run_workflow(@evaluator, 'inference')"],
    }


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def metadata(source: SourceModel) -> dict[str, Any]:
    """``configs/metadata.json``: channels, outputs, the mask input, provenance and versions."""
    import monai

    _, cm, lm = _configuration(source)
    names, heads = source.channel_names, output_heads(source)
    dims = len(cm.patch_size)
    # multiples of twice the total stride: the bottleneck keeps more than one voxel (instance norm needs that)
    shape = [f"{2 * s}*n" for s in _total_strides(source.spec, dims)]
    dataset = source.plans.get("dataset_name", source.folder.parent.name)
    modality = "CT" if all(n.upper() == "CT" for n in names) else "MR"
    written = ", ".join(f"{h['writes']} {h['name']}" for h in heads if h["writes"] != 0)
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by nnunet-gmd export-bundle from {source.trainer}, {dataset}, "
                                      f"{source.configuration}, fold {source.fold}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {p: _version(p) for p in ("nnunet-gmd", "nnunetv2", "pytorch-ignite",
                                                              "SimpleITK", "nibabel", "fire")},
        "supported_apps": {},
        "name": f"{dataset} {source.trainer} (nnU-Net {source.configuration}, fold {source.fold})",
        "task": f"Segmentation from any subset of the input channels {', '.join(names)}",
        "description": (f"Dynamic Sharing network trained by nnU-Net ({source.trainer}): every input channel is a "
                        f"branch through shared convolutions, absent channels are switched off by the availability "
                        f"mask. Preprocessing, sliding window and export are nnU-Net's, from the model's plans "
                        f"(configs/nnunet/)."),
        "authors": "nnunet-gmd contributors (exporter); the model's trainer",
        "copyright": "Copyright (c) the model's authors",
        "data_source": f"nnU-Net dataset {dataset} ({source.dataset_json.get('name', dataset)}); see docs/README.md",
        "data_type": "nibabel" if source.dataset_json["file_ending"].startswith(".nii") else
                     source.dataset_json["file_ending"],
        "image_classes": (f"{len(names)} channels in the order {', '.join(names)} (file suffixes "
                          f"{', '.join('_' + k for k in source.channel_keys)}); any may be absent, at least one "
                          f"is required"),
        "label_classes": json.dumps(source.dataset_json["labels"]),
        "pred_classes": f"one label map with the nnU-Net dataset's values: 0 background, {written}",
        "eval_metrics": {},
        "intended_use": "Research only. Not a medical device: not for diagnosis, treatment or any clinical decision "
                        "without independent validation on the target population, scanners and protocols.",
        "references": [GMD_REFERENCE, NNUNET_REFERENCE],
        "nnunet": {"dataset": dataset, "trainer": source.trainer,
                   "plans": source.plans.get("plans_name", "nnUNetPlans"), "configuration": source.configuration,
                   "fold": source.fold, "checkpoint": source.checkpoint.name, "epoch": source.epoch,
                   "network": source.spec.target, "channel_names": source.dataset_json["channel_names"],
                   "labels": source.dataset_json["labels"],
                   "regions_class_order": source.dataset_json.get("regions_class_order")},
        "network_data_format": {
            "inputs": {
                "image": {"type": "image", "format": "magnitude", "modality": modality,
                          "num_channels": len(names), "spatial_shape": shape, "dtype": "float32",
                          "value_range": [], "is_patch_data": True,
                          "channel_def": {str(i): n for i, n in enumerate(names)}},
                "available": {
                    "type": "tabular", "format": "binary", "modality": modality, "num_channels": len(names),
                    "spatial_shape": [], "dtype": "bool", "value_range": [0, 1], "is_patch_data": False,
                    "channel_def": {str(i): f"{n} available" for i, n in enumerate(names)},
                    "description": f"Second forward argument: availability mask of shape (B, {len(names)}) or "
                                   f"({len(names)},), True where a channel is present; absent branches are switched "
                                   f"off. Omitted: all channels are used."},
            },
            "outputs": {
                "pred": {"type": "image", "format": "segmentation", "num_channels": len(heads),
                         "spatial_shape": shape, "dtype": "float32", "value_range": [], "is_patch_data": True,
                         "channel_def": {str(i): f"{h['name']} ({h['activation']} logit)"
                                         for i, h in enumerate(heads)}},
            },
        },
    }


# ---------------------------------------------------------------------------------------------- writing
def readable_json(content: Any, width: int = 116) -> str:
    """JSON with every list or object that fits in ``width`` columns on one line (configs people read and edit)."""
    def render(value: Any, indent: int) -> str:
        flat = json.dumps(value, allow_nan=False)
        if len(flat) + indent <= width or not isinstance(value, (dict, list)) or not value:
            return flat
        pad = " " * (indent + 4)
        if isinstance(value, list):
            items = [pad + render(v, indent + 4) for v in value]
            return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
        items = [f"{pad}{json.dumps(k)}: {render(v, indent + 4)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return render(content, 0) + "\n"


def export_bundle(source: SourceModel, output: Path, overwrite: bool = False) -> Path:
    """Write the bundle into ``output`` (built beside it, then moved into place)."""
    from nnunet_gmd.nnunet.bundle_docs import bundle_readme, license_text

    check_channel_keys(source)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise UserError(f"{output} exists and is not empty (use --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        configs = tmp / "configs"
        (configs / "nnunet").mkdir(parents=True)
        shutil.copyfile(source.folder / "plans.json", configs / "nnunet" / "plans.json")
        shutil.copyfile(source.folder / "dataset.json", configs / "nnunet" / "dataset.json")
        write_text(configs / "inference.json", readable_json(inference_config(source)))
        write_text(configs / "metadata.json", readable_json(metadata(source)))
        (tmp / "models").mkdir()
        torch.save(source.weights, tmp / "models" / "model.pt")
        write_text(tmp / "docs" / "README.md", bundle_readme(source, output_heads(source)))
        write_text(tmp / "LICENSE", license_text(source, LICENSE_FILE.read_text()))
        os.chmod(tmp, 0o777 & ~_umask())
        if output.exists():
            old = output.parent / f".{output.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
