"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory written under a temporary name and renamed into place, so a run
killed while saving keeps the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TENSORS = "tensors.safetensors"
STATE = "state.json"


def _optimizer_parts(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write modules, optimizers, extra tensors and JSON state to the directory `path`, atomically."""
    flat: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            flat[f"module/{name}/{key}"] = value.detach().cpu().contiguous()
    opt_meta = {}
    for name, optimizer in optimizers.items():
        opt_tensors, opt_meta[name] = _optimizer_parts(f"optim/{name}", optimizer)
        flat.update(opt_tensors)
    for key, value in (tensors or {}).items():
        flat[f"extra/{key}"] = value.detach().cpu().contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(flat, str(tmp / TENSORS))
    (tmp / STATE).write_text(json.dumps({"state": state, "optimizers": opt_meta}, indent=2))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore modules and optimizers in place (strictly); returns (JSON state, extra tensors)."""
    flat = load_file(str(path / TENSORS))
    meta = json.loads((path / STATE).read_text())
    for name, module in modules.items():
        prefix = f"module/{name}/"
        module.load_state_dict({k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}, strict=True)
    for name, optimizer in optimizers.items():
        prefix = f"optim/{name}/"
        state: dict[int, dict[str, Any]] = {}
        for key, value in flat.items():
            if key.startswith(prefix):
                pid, field = key[len(prefix) :].split("/", 1)
                state.setdefault(int(pid), {})[field] = value
        for key, value in meta["optimizers"][name]["scalars"].items():
            pid, field = key.split("/", 1)
            state.setdefault(int(pid), {})[field] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizers"][name]["param_groups"]})
    extra = {k[len("extra/") :]: v for k, v in flat.items() if k.startswith("extra/")}
    return meta["state"], extra
