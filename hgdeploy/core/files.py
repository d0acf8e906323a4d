"""Files the toolkit writes: atomically, staged as a whole, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from hgdeploy.core.errors import UserError


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    write_atomic_bytes(path, text.encode())


def file_mode() -> int:
    """The mode a plain open() would give a new file under the user's umask (mkstemp's is always 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def folder_mode() -> int:
    """The mode a plain mkdir() would give a new folder under the user's umask (mkdtemp's is always 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_atomic_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """`path`'s name inside a hidden staging folder beside it, for writers of more than one file (an ONNX graph
    and the weights it references by file name). On success every staged file replaces its namesake beside
    `path`, `path` itself last, so a reader never finds the graph without its weights; on failure or Ctrl-C
    nothing is left behind."""
    path = Path(path)
    with _staging_beside(path) as staging:
        yield staging / path.name
        for item in sorted(staging.iterdir(), key=lambda f: f.name == path.name):
            os.chmod(item, file_mode())  # onnx writes external data as 0600
            os.replace(item, path.parent / item.name)


def check_output_folder(out: Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written: an existing file, a file on its
    path, no permission to write there (files are staged beside it, in its parent, then moved in). `option`:
    the command-line option that named the folder, for the message."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder; choose another {option}")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: no permission to write in this folder; choose another {option}")
    for place in out.parents:
        if place.exists():
            if not place.is_dir():
                raise UserError(f"{option} {out} lies under {place}, which is a file, not a folder; choose another "
                                f"{option}")
            if not os.access(place, os.W_OK | os.X_OK):
                raise UserError(f"{option} {out}: no permission to write in {place}; choose another {option}")
            break
    return out


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A hidden staging folder beside `out`; its files replace those in `out` only on success."""
    out = Path(out)
    with _staging_beside(out) as staging:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            item.replace(out / item.name)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden staging folder that becomes `out`, whole, on success: for a folder that is one artefact (a Triton
    model repository), never seen half-written nor mixed with files of an earlier one. An existing `out` is moved
    aside just before and removed after (Linux cannot swap two folders in one rename, so `out` is missing for the
    moment between the two renames); on failure or Ctrl-C `out` is left as it was."""
    out = Path(out)
    with _staging_beside(out) as staging:
        yield staging
        os.chmod(staging, folder_mode())
        with _staging_beside(out) as aside:
            if out.exists():
                os.replace(out, aside / out.name)
            try:
                os.replace(staging, out)
            except BaseException:
                if (aside / out.name).exists():
                    os.replace(aside / out.name, out)
                raise


@contextlib.contextmanager
def _staging_beside(path: Path) -> Iterator[Path]:
    """A new hidden folder `.<name>.staging-*` beside `path` (the name .gitignore and users recognise), removed
    with whatever is left in it when the block ends, however it ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# A JSON document as the reports and manifests write it: results are typed where they are made and cross
# rooms, and serialised into this shape in one place each (their to_json).
JsonValue = str | int | float | bool | None | list["JsonValue"] | dict[str, "JsonValue"]
JsonObject = dict[str, JsonValue]


def to_json(document: JsonObject) -> str:
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def file_sha256(*paths: Path) -> str:
    """One sha256 over the files' bytes, in order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
