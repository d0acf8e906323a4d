"""Hugging Face checkpoints as users have them: the folder `save_pretrained` writes (config.json + weights).

Shared by every adapter built on a transformers model (DPT, Depth Anything, Mask2Former, SwinV2, SAM): the config
is read from the folder only (never the hub), its model_type must be the family's, the weights load strictly.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import Tensor, nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.recipe import Section
from hgdeploy.models.checkpoints import existing, read_safetensors, read_weights, state_dict_from

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX = "model.safetensors.index.json"

# The architecture facts a checkpoint and a named arch must agree on (depths, widths, windows).
Fingerprint = dict[str, int | bool | list[int]]


def checkpoint_folder(path: str | Path) -> Path:
    folder = existing(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise UserError(f"checkpoint {folder} is not a Hugging Face model folder: pass the folder save_pretrained "
                        f"wrote (config.json + model.safetensors)")
    return folder


def read_config(folder: Path, model_type: str, config_class: Any, family: str) -> Any:
    """folder/config.json as `config_class`; its model_type must be `model_type`."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({str(exc)[:160]})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a model configuration (expected a JSON object)")
    if data.get("model_type") != model_type:
        raise UserError(f"{path} has model_type {data.get('model_type')!r}, family {family} needs {model_type!r}; "
                        f"use the family that matches the checkpoint")
    try:
        return config_class.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path} is not a valid {model_type} configuration ({str(exc).splitlines()[0][:160]})") from exc


def read_folder_weights(folder: Path) -> tuple[dict[str, Tensor], str]:
    """The state dict in a save_pretrained folder: model.safetensors, its shards, or pytorch_model.bin."""
    index = folder / SHARD_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index} is not a readable shard index ({str(exc)[:160]})") from exc
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state, str(index)
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return state_dict_from(read_weights(path), str(path)), str(path)
    raise UserError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """save_pretrained and from_pretrained draw a progress bar per call; not in our output."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def write_checkpoint(model: nn.Module, folder: Path) -> Path:
    """A wrapper's transformers model (`model.hf`) saved with save_pretrained(folder): config.json +
    model.safetensors, the layout users download (every HF family's Family.write_checkpoint)."""
    folder = Path(folder)
    with quiet_progress():
        model.hf.save_pretrained(str(folder))
    return folder


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """from_pretrained logs every missing key and draws a bar; we report what matters as one UserError."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with quiet_progress():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_pretrained(model_class: Any, folder: Path, config: Any) -> nn.Module:
    """model_class.from_pretrained(folder) with `config`, offline, strictly: transformers' own loader, because
    it maps the key names earlier releases saved (Swin's, SAM's) and ties shared weights; a missing, unexpected
    or mismatched weight is a UserError instead of its warning and a silently random tensor."""
    if not any((folder / name).is_file() for name in (*WEIGHT_FILES, SHARD_INDEX)):
        raise UserError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        with quiet_loading():
            # mismatched sizes are reported in `info` (and refused below, naming the weight and both shapes) rather
            # than raised: transformers' own error only points at a report its logging prints
            model, info = model_class.from_pretrained(str(folder), config=config, local_files_only=True,
                                                      output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and transformers each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{folder}: the weights do not load ({first})") from exc
    mismatched = [k for k in info.get("mismatched_keys") or [] if not isinstance(k, str) and len(k) == 3]
    if mismatched:
        name, found, expected = sorted(mismatched, key=lambda k: str(k[0]))[0]
        more = f" (and {len(mismatched) - 1} more weights of another shape)" if len(mismatched) > 1 else ""
        raise UserError(f"{folder}: {name} has shape {tuple(found)}, the model expects {tuple(expected)}{more}")
    problems = (("missing_keys", "is missing weights for"), ("unexpected_keys", "has weights the model does not have:"),
                ("mismatched_keys", "has weights of another shape:"))
    for key, what in problems:
        found = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if found:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise UserError(f"{folder} {what} {found[0]}{more}: it was saved from another architecture or "
                            f"configuration")
    return model.eval()


def load_or_build(family: str, checkpoint: str | None, options: Section, archs: dict[str, Any],
                  model_type: str, config_class: Any, model_class: Any, fit: Any, fingerprint: Callable[[Any], Fingerprint],
                  randomise: Any = None) -> nn.Module:
    """The transformers model of a family: from a save_pretrained folder, or built from model.arch (a published
    configuration, data here) with random weights (seed 0). fit(config) adapts a config to the run (input size)
    and returns it; fingerprint(config) is what a checkpoint and a named arch must agree on; randomise(model)
    re-draws the random weights where transformers' init leaves the outputs near zero (SAM: ~1e-22, where every
    parity check passes whatever the graph computes)."""
    import torch

    arch = options.get("arch")
    if arch is not None and arch not in archs:
        raise UserError(f"model.arch={arch!r} is not a {family} architecture; use one of: {', '.join(archs)}")
    if checkpoint is None:
        if arch is None:
            raise UserError(f"family {family} needs model.checkpoint (a save_pretrained folder) or model.arch "
                            f"(one of: {', '.join(archs)}) for random weights")
        torch.manual_seed(0)
        model = model_class(fit(config_class(**archs[arch]()))).eval()
        return model if randomise is None else randomise(model)
    folder = checkpoint_folder(checkpoint)
    config = read_config(folder, model_type, config_class, family)
    if arch is not None:
        want, got = fingerprint(config_class(**archs[arch]())), fingerprint(config)
        if want != got:
            raise UserError(f"{folder}/config.json ({got}) is not model.arch={arch!r} ({want}); drop model.arch or "
                            f"fix it")
    return load_pretrained(model_class, folder, fit(config))
