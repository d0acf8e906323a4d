"""The one small interface every backend module implements (Polygraphy's runners do the running)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from polygraphy.backend.base import BaseRunner

from hgdeploy.backends.profile import EngineProfile


@dataclass(frozen=True)
class Backend:
    """A backend as the rest of the toolkit sees it.

    check(profile): backend-specific profile rules (UserError). available(profile): why this machine
    cannot run the profile, or None. runner(onnx_path, profile): a Polygraphy runner, built lazily on
    activate. versions(profile): library versions (and GPU) to record with every measurement.
    """

    name: str
    check: Callable[[EngineProfile], None]
    available: Callable[[EngineProfile], str | None]
    runner: Callable[[Path, EngineProfile], BaseRunner]
    versions: Callable[[EngineProfile], dict[str, str]]
