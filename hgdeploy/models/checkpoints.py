"""Reading users' checkpoint files safely, with errors that name the problem.

Every family's loader goes through these: torch files are read with `weights_only=True` (a
checkpoint is data, never code), and a state dict is matched against the model key by key before
anything is copied, so a wrong layout, a missing key or a shape mismatch is reported by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hgdeploy.core.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def existing(path: str | Path, what: str = "checkpoint") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    return p


def read_torch_file(path: str | Path) -> Any:
    """torch.load with weights_only=True; anything unreadable is a UserError naming the file."""
    p = existing(path)
    if p.is_dir():
        raise UserError(f"checkpoint {p} is a folder; pass the weights file inside it")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file (even IndexError)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{p} is not a readable PyTorch checkpoint ({reason[:160]})") from exc


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = existing(path)
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{p} is not a readable safetensors file ({str(exc)[:160]})") from exc


def read_weights(path: str | Path) -> Any:
    """A .safetensors file or a torch file, by suffix (torch for anything else)."""
    p = existing(path)
    return read_safetensors(p) if p.suffix == ".safetensors" else read_torch_file(p)


def state_dict_from(obj: Any, source: str, keys: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint: the object itself, or the first of `keys` it holds.

    keys=() means the file must be a flat state dict (str -> tensor).
    """
    if keys:
        if not isinstance(obj, dict) or not any(k in obj for k in keys):
            found = ", ".join(sorted(map(str, obj))[:6]) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{source} is not in the expected layout: no {' or '.join(repr(k) for k in keys)} entry "
                            f"(found: {found})")
        obj = obj[next(k for k in keys if k in obj)]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{source} does not hold a state dict of tensors")
    return obj


def load_state_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy `state` into `module` after checking that keys and shapes match exactly."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{source} is missing weights for {missing[0]}{more}: it was saved from another architecture "
                        f"or configuration")
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise UserError(f"{source} has weights the model does not have: {unexpected[0]}{more}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=True)
