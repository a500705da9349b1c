"""One case under many channel subsets (what ``nnunet-gmd evaluate`` needs), reading and preprocessing it once."""
from __future__ import annotations

import multiprocessing
from copy import deepcopy
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy

from nnunet_gmd.errors import UserError
from nnunet_gmd.networks import only_available
from nnunet_gmd.nnunet.cases import CaseFiles, check_case
from nnunet_gmd.nnunet.model import channel_names, ds_network, refuse_cascade
from nnunet_gmd.subsets import Subset, subset_mask


def zero_preserving_channels(predictor: nnUNetPredictor) -> list[bool]:
    """Per channel, whether nnU-Net's normalization maps an all-zero image to zeros (z-scoring does, CT does not).

    Resampling keeps zeros at zero, so for these channels a zero-filled file preprocesses to exactly zero.
    """
    cm, pm = predictor.configuration_manager, predictor.plans_manager
    n = len(predictor.dataset_json["channel_names"])
    preprocessor = cm.preprocessor_class(verbose=False)
    normalized = preprocessor._normalize(np.zeros((n, 2, 2, 2), dtype=np.float32), np.zeros((1, 2, 2, 2), np.int8),
                                         cm, pm.foreground_intensity_properties_per_channel)
    return [bool(np.all(normalized[c] == 0)) for c in range(n)]


class _Exporter:
    """nnU-Net's export (resample to the input geometry, write the file), inline or in a bounded worker pool."""

    def __init__(self, num_processes: int):
        self._pool = multiprocessing.get_context("spawn").Pool(num_processes) if num_processes > 0 else None
        self._workers = list(self._pool._pool) if self._pool is not None else []   # as nnU-Net watches them
        self._pending: list = []
        self._limit = 2 * max(num_processes, 1)

    def _wait(self, result) -> None:
        """``result.get()``, but a dead worker (killed, out of memory) is an error instead of a hang: the pool
        replaces it silently and its task never finishes."""
        while not result.ready():
            check_workers_alive_and_busy(self._pool, self._workers, [], 0)   # raises if a worker died
            result.wait(0.5)
        result.get()

    def __call__(self, *args) -> None:
        if self._pool is None:
            export_prediction_from_logits(*args)
            return
        while len(self._pending) >= self._limit:
            self._wait(self._pending.pop(0))
        logits, *rest = args  # as nnU-Net's own pool: numpy to the workers
        self._pending.append(self._pool.apply_async(export_prediction_from_logits, (logits.numpy(), *rest)))

    def close(self) -> None:
        if self._pool is not None:
            try:
                for result in self._pending:
                    self._wait(result)
            except BaseException:
                self._pool.terminate()
                raise
            else:
                self._pool.close()
            finally:
                self._pool.join()


def predict_case_subsets(predictor: nnUNetPredictor, cases: Sequence[CaseFiles],
                         outputs: Callable[[CaseFiles, Subset], Path], subsets: Sequence[Subset],
                         num_processes_segmentation_export: int = 0,
                         on_prediction: Optional[Callable[[], None]] = None) -> dict[str, int]:
    """Predict every case from each of ``subsets``, as ``predict_cases(..., forced=subset)`` would, reading once.

    ``outputs(case, subset)`` is the output file name without its ending. A case is read, checked and preprocessed
    once with all channels. Preprocessing depends on the absent channels only through the nonzero mask (crop box
    and normalization region) and through what a zero image normalizes to; when the present channels have the
    same nonzero voxels as the whole case and the absent channels normalize zeros to zeros, the whole case's array
    with the absent channels set to zero *is* the zero-filled case's preprocessed array. Other subsets are
    preprocessed again from the zero-filled array, in memory. Returns how many subset predictions took each route.
    """
    refuse_cascade(predictor)
    cm, pm, dataset_json = predictor.configuration_manager, predictor.plans_manager, predictor.dataset_json
    names = channel_names(dataset_json)
    full = tuple(range(len(names)))
    reader = pm.image_reader_writer_class()
    preprocessor = cm.preprocessor_class(verbose=False)
    zero_stays_zero = zero_preserving_channels(predictor)
    ds = ds_network(predictor)
    routes = {"reused": 0, "preprocessed": 0}
    exporter = _Exporter(num_processes_segmentation_export)
    try:
        for case in cases:
            missing = [names[c] for c in full if c not in case.files]
            if missing:
                raise UserError(f"case {case.case_id}: {', '.join(missing)} missing; scoring under every subset "
                                f"needs all channel files")
            check_case(case, reader)
            raw, props = reader.read_images([str(case.files[c]) for c in full])
            whole, _, whole_props = preprocessor.run_case_npy(raw, None, deepcopy(props), pm, cm, dataset_json)
            nonzero = raw != 0
            nonzero_all = nonzero.any(0)
            for subset in subsets:
                absent = [c for c in full if c not in subset]
                if all(zero_stays_zero[c] for c in absent) and np.array_equal(nonzero[list(subset)].any(0),
                                                                               nonzero_all):
                    data, data_props = whole.copy(), whole_props
                    data[absent] = 0
                    routes["reused"] += 1
                else:
                    filled = raw.copy()
                    filled[absent] = 0
                    data, _, data_props = preprocessor.run_case_npy(filled, None, deepcopy(props), pm, cm,
                                                                    dataset_json)
                    routes["preprocessed"] += 1
                with only_available(ds, None if subset == full else subset_mask(subset, len(names))):
                    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
                out = Path(outputs(case, subset))
                out.parent.mkdir(parents=True, exist_ok=True)
                exporter(logits, deepcopy(data_props), cm, pm, dataset_json, str(out), False)
                if on_prediction is not None:
                    on_prediction()
    finally:
        exporter.close()
    return routes
