"""Saving and loading model weights as safetensors, strictly."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import OcdError


def save_weights(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `module`'s state dict to `path` (through a temporary file)."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_weights(module: nn.Module, path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """Load safetensors into `module`; every key must match (no silent skipping)."""
    try:
        state = load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise OcdError(f"weights not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise OcdError(f"cannot read weights {path}: {exc}") from None
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise OcdError(
            f"weights {path} do not fit the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return module.to(device)
