"""The text files of an exported bundle: ``docs/README.md`` and ``LICENSE``.

Written from the model itself (dataset.json, plans, checkpoint), so the README states the source dataset and
trainer, the channel and label order and the commands that run this very bundle.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnunet_gmd.nnunet.export_bundle import SourceModel


def bundle_readme(source: "SourceModel", heads: list[dict[str, Any]]) -> str:
    """``docs/README.md`` of an exported bundle."""
    from nnunet_gmd.nnunet.export_bundle import GMD_REFERENCE, NNUNET_REFERENCE, _configuration

    _, cm, lm = _configuration(source)
    dataset = source.plans.get("dataset_name", source.folder.parent.name)
    ending = source.dataset_json["file_ending"]
    keys = source.channel_keys
    channels = "\n".join(f"| {i} | {n} | `<case>_{k}{ending}` |" for i, (n, k) in
                         enumerate(zip(source.channel_names, keys)))
    outputs = "\n".join(f"| {i} | {h['name']} | labels {h['labels']} | {h['activation']} | {h['writes']} |"
                        for i, h in enumerate(heads))
    if lm.has_regions:
        label_rule = ("Region-based model: each output channel is one region (sigmoid, threshold 0.5); the file "
                      "gets the channel's value where its region is predicted, later channels overwriting "
                      "earlier ones (nnU-Net's `regions_class_order`).")
    else:
        label_rule = "Each output channel is one label (softmax); the file holds the arg-max label value."
    mirror = (f"mirroring over axes {source.mirror_axes} (the checkpoint's `inference_allowed_mirroring_axes`)"
              if source.mirror_axes else "no mirroring (the checkpoint allows none)")
    first = keys[0]
    return f"""# {dataset}: {source.trainer} exported from nnU-Net

A Dynamic Sharing model trained by nnU-Net v2 and exported with `nnunet-gmd export-bundle`. Every input channel
runs as a branch through shared convolutions; a channel that is absent is switched off by the availability mask
(not imputed), so a case may come with **any non-empty subset** of the channels.

## Source

| | |
|---|---|
| dataset | {dataset} (`configs/nnunet/dataset.json`) |
| trainer | {source.trainer} |
| plans / configuration | {source.plans.get("plans_name", "nnUNetPlans")} / {source.configuration} |
| fold | {source.fold} (checkpoint `{source.checkpoint.name}`, epoch {source.epoch}) |
| network | `{source.spec.target}` (`network_def` in `configs/inference.json`, weights `models/model.pt`) |

One fold per bundle: a MONAI bundle carries one network. To deploy several folds, export each into its own
bundle; for one model trained on all cases, train fold `all` and export that.

**Intended use: research only.** Not a medical device; do not use it for diagnosis, treatment or any clinical
decision without independent validation on your population, scanners and protocols. The weights inherit the
terms of the data they were trained on (dataset.json licence: {source.dataset_json.get("licence", source.dataset_json.get("license", "not stated"))}).

## Input

Case folders `DIR/<case>/<case>_<channel name in lower case>{ending}`, any subset of:

| channel | name | file |
|---|---|---|
{channels}

or a datalist JSON (`--datalist_file`), relative paths resolved against `dataset_dir`:

```json
{json.dumps({"testing": [{"case": "case1", first: f"/data/case1/case1_{first}{ending}"}]})}
```

## Output

`OUTPUT_DIR/<case>{ending}`: one label map on the case's input grid, with the nnU-Net dataset's label values
(exactly what `nnunet-gmd predict` writes for the same files).

| network channel | region / label | dataset labels | activation | written value |
|---|---|---|---|---|
{outputs}

{label_rule}

## Run

```bash
python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\
    --dataset_dir DIR --output_dir OUT
# or --datalist_file cases.json;  --device '$torch.device("cpu")' to force the CPU
python -m monai.bundle verify_net_in_out network_def --meta_file BUNDLE/configs/metadata.json \\
    --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE
python -m monai.bundle ckpt_export network_def --filepath BUNDLE/models/model.ts \\
    --ckpt_file BUNDLE/models/model.pt --meta_file BUNDLE/configs/metadata.json \\
    --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE
```

Needs `pip install nnunet-gmd` (which brings nnU-Net v2 and MONAI). The scripted model keeps the mask as a
runtime input: `model(x)` uses all channels, `model(x, available)` switches branches off per case.

## Pipeline (nnU-Net's own functions, driven by `configs/nnunet/plans.json`)

1. `NnUNetPreprocessd`: read the present channel files with the plan's reader, zero images for absent
   channels; transpose, crop to the nonzero box of all channels, per-channel normalisation
   ({", ".join(f"{k}: {s}" for k, s in zip(keys, cm.normalization_schemes))}), resampling to spacing
   {list(cm.spacing)}.
2. `NnUNetSlidingWindowInferer`: windows of `roi_size` {list(cm.patch_size)} (the plan's patch size), step 0.5,
   Gaussian weighting, {mirror}.
3. `NnUNetSaveSegmentationd`: logits resampled back, nonlinearity, labels, crop and transpose undone, written
   with the plan's writer.

`spacing`, `roi_size`, `normalization_schemes`, `use_mask_for_norm`, `tile_step_size` and `use_mirroring` in
`configs/inference.json` hold the plan's values; changing them changes the pipeline accordingly.

## References

- {GMD_REFERENCE}
- {NNUNET_REFERENCE}

## License

Code and configs: Apache-2.0 (`LICENSE`). Weights: the terms of the training data.
"""


def license_text(source: "SourceModel", apache: str) -> str:
    """``LICENSE``: Apache-2.0 for configs and code, plus the data terms the weights inherit."""
    dataset = source.plans.get("dataset_name", source.folder.parent.name)
    data_terms = source.dataset_json.get("licence", source.dataset_json.get("license", "not stated in dataset.json"))
    return f"""MONAI bundle exported by nnunet-gmd from {dataset} ({source.trainer}, fold {source.fold})

The configuration files of this bundle are licensed under the Apache License, Version 2.0 (full text below),
the licence of the nnunet-gmd package whose code they call.

The model weights in models/ are derived from the data they were trained on and inherit that data's terms.
dataset.json states: {data_terms}
The bundle is for research only and is not a medical device.

-------------------------------------------------------------------------------------------------------------

{apache}"""
