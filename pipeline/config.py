"""Typed stage configs, TOML loading and command-line overrides.

Precedence, lowest first: dataclass defaults, the task's defaults, the `--config` TOML file
(one table per stage: [base], [overfit], [train], [evaluate]), command-line options.
Fields marked ``runtime`` change how a stage runs, not what it produces, and stay out of cache keys.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from .errors import OcdError
from .layer_selection import LayerSelectionConfig

T = TypeVar("T")


def runtime(default: Any) -> Any:
    """A config field that does not influence results (excluded from cache keys)."""
    return field(default=default, metadata={"runtime": True})


@dataclass(frozen=True)
class BaseConfig:
    """Stage zero: training the base model."""

    epochs: int = 10  #: passes over the training split
    batch_size: int = 64  #: minibatch size
    lr: float = 1e-3  #: Adam learning rate
    weight_decay: float = 0.0  #: Adam weight decay
    seed: int = 0  #: initialisation and shuffling seed


@dataclass(frozen=True)
class OverfitConfig:
    """Stage one: per-sample finetuning of one layer, written to the record store."""

    steps: int = 3  #: Adam steps on each single sample (paper, MNIST: 3)
    lr: float = 5e-4  #: Adam learning rate (paper, MNIST: 5e-4)
    layer: str = ""  #: layer to overfit; empty = the task's default; "auto" = top of `ocd select-layer`
    block_size: int = runtime(256)  #: samples per Dask task and per Zarr chunk
    codec: str = runtime("blosc-lz4")  #: chunk compression: none, blosc-lz4, zstd


@dataclass(frozen=True)
class TrainConfig:
    """Stage two: training the conditional diffusion model on the store's train split."""

    profile: str = "quick"  #: denoiser profile (diffusion.PROFILES): quick, paper, tiny
    epochs: int = 10  #: passes over the train split
    batch_size: int = 32  #: minibatch size
    lr: float = 2e-4  #: denoiser Adam learning rate (paper: 2e-4)
    scale_lr: float = 1e-3  #: scale-model Adam learning rate (paper: 1e-3)
    grad_clip: float = 1.0  #: gradient-norm clip
    ema_decay: float = 0.999  #: EMA decay of the weights used for sampling
    shuffle_buffer: int = 1024  #: records held in the streaming shuffle buffer
    seed: int = 0  #: initialisation, noise and shuffling seed
    num_workers: int = runtime(0)  #: DataLoader worker processes (0 = in-process)
    checkpoint_every: int = runtime(200)  #: optimisation steps between checkpoints


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation on the test split."""

    ensemble: int = 5  #: OCD ensemble size (K)
    steps: int = 10  #: DDIM steps per sample
    eta: float = 0.0  #: DDIM eta (0 = deterministic given the starting noise)
    bootstrap: int = 1000  #: bootstrap resamples for the intervals
    alternative_layer: bool = False  #: also run OCD on the next-ranked layer (paper's ablation; trains a 2nd model)
    seed: int = 0  #: starting-noise and bootstrap seed


STAGE_CONFIGS: dict[str, type] = {
    "select": LayerSelectionConfig,
    "base": BaseConfig,
    "overfit": OverfitConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}


def key_fields(cfg: Any) -> dict[str, Any]:
    """The fields of `cfg` that determine results (runtime fields dropped)."""
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if not f.metadata.get("runtime", False)
    }


def _check_type(cls: type, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_type(cls, name, value, arg)
            except OcdError:
                continue
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
            return tuple(_check_type(cls, name, v, item) for v in value)
    elif isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    shown = getattr(hint, "__name__", str(hint))
    raise OcdError(f"config {cls.__name__}.{name}: expected {shown}, got {value!r}")


def build_config(cls: type[T], *layers: dict[str, Any] | None) -> T:
    """Instantiate `cls` from dicts applied in order; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for name, value in (layer or {}).items():
            if value is None:
                continue
            if name not in hints:
                known = ", ".join(hints)
                raise OcdError(f"unknown {cls.__name__} field {name!r} (known: {known})")
            values[name] = _check_type(cls, name, value, hints[name])
    return cls(**values)


def read_config_file(path: Path | None) -> dict[str, dict[str, Any]]:
    """Read a TOML config: a table per stage. Unknown tables are errors."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OcdError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OcdError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise OcdError(f"config file {path} is not valid TOML: {exc}") from None
    for section, table in data.items():
        if section not in STAGE_CONFIGS:
            raise OcdError(f"config file {path}: unknown table [{section}] (known: {', '.join(STAGE_CONFIGS)})")
        if not isinstance(table, dict):
            raise OcdError(f"config file {path}: [{section}] must be a table")
        build_config(STAGE_CONFIGS[section], table)  # validate early
    return data
