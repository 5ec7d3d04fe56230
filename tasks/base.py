"""The task interface: everything the pipeline needs to know about one domain.

A task bundles a deterministic train/test split (Hugging Face ``datasets`` objects in torch
format with columns ``input`` and ``label``), a model constructor, the name of the layer to
overfit, a per-sample loss and the metrics. Domains whose signals are large (a NeRF view's
thousands of ray points, a separated waveform) supply ``summarize_activation`` and
``encode_output`` to turn them into fixed-size conditioning vectors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor


def identity(x: Tensor) -> Tensor:
    return x


def mean_outputs(outputs: Tensor) -> Tensor:
    """Combine K ensemble members' outputs (K, B, ...) by their mean."""
    return outputs.mean(dim=0)


@dataclass
class Task:
    """One domain. Only the first six fields are required."""

    name: str  #: registry name, also recorded in every store
    load_data: Callable[[Path], datasets.DatasetDict]  #: cache dir -> {"train", "test"} with input, label
    build_model: Callable[[], nn.Module]  #: a fresh, untrained base model
    layer: str  #: dotted name of the module to overfit (``model.get_submodule(layer)``)
    loss: Callable[[Tensor, Tensor], Tensor]  #: (output, label) -> per-sample loss, shape (B,)
    metrics: Callable[[Tensor, Tensor], dict[str, float]]  #: (outputs, labels) of a whole split -> values
    description: str = ""  #: one line for ``ocd tasks``
    version: str = "1"  #: bump when the task's definition changes: invalidates its caches
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  #: per-stage config defaults
    combine_outputs: Callable[[Tensor], Tensor] = mean_outputs  #: ensemble (K, B, ...) -> (B, ...)
    encode_output: Callable[[Tensor], Tensor] = identity  #: network output -> conditioning features
    summarize_activation: Callable[[Tensor], Tensor] = identity  #: (B, *act) -> fixed-size (B, *)
    lower_is_better: dict[str, bool] = field(default_factory=dict)  #: metric name -> direction

    def data(self, cache_dir: Path) -> datasets.DatasetDict:
        """The task's splits, validated."""
        from ..pipeline.data import validate_splits

        return validate_splits(self.load_data(Path(cache_dir)), self.name)


def make_split(inputs: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """A torch-format ``datasets.Dataset`` with columns ``input`` and ``label`` from arrays."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    feature_shape = inputs.shape[1:]
    array_types = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}
    if len(feature_shape) == 0:
        input_feature: Any = datasets.Value("float32")
    elif len(feature_shape) == 1:
        input_feature = datasets.Sequence(datasets.Value("float32"), length=feature_shape[0])
    else:
        input_feature = array_types[len(feature_shape)](shape=feature_shape, dtype="float32")
    label_dtype = "int64" if np.issubdtype(labels.dtype, np.integer) else "float32"
    if labels.ndim == 1:
        label_feature: Any = datasets.Value(label_dtype)
    elif labels.ndim == 2:
        label_feature = datasets.Sequence(datasets.Value(label_dtype), length=labels.shape[1])
    else:
        label_feature = array_types[labels.ndim](shape=labels.shape[1:], dtype=label_dtype)
    features = datasets.Features({"input": input_feature, "label": label_feature})
    ds = datasets.Dataset.from_dict({"input": inputs, "label": labels.astype(label_dtype)}, features=features)
    return ds.with_format("torch")


def seeded_split(n: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, test_idx) for n samples with a fixed seed."""
    order = np.random.default_rng(seed).permutation(n)
    return order[n_test:], order[:n_test]
