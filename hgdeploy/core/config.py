"""What recipes and engine profiles share: where bundled TOMLs live, finding one by name, naming unknown keys."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable, Mapping

from hgdeploy.core.errors import UserError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # hgdeploy/, where a wheel keeps _recipes and _engines
REPO_ROOT = PACKAGE_ROOT.parent


def bundled_folders(subdir: str) -> tuple[Path, Path]:
    """Where bundled TOMLs of `subdir` ("export", "engines") live: inside the installed wheel, then the checkout."""
    return (PACKAGE_ROOT / f"_{'recipes' if subdir == 'export' else subdir}", REPO_ROOT / subdir)


def resolve_toml(arg: str | None, default: str, folders: Iterable[Path], subdir: str, what: str) -> Path:
    """An existing path as given, else a bundled file by name ("x", "x.toml" or "<subdir>/x.toml")."""
    folders = list(folders)
    path = Path(arg or default)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".toml") else path.name
    if path.parent in (Path("."), Path(subdir)):
        for folder in folders:
            if (folder / f"{stem}.toml").is_file():
                return folder / f"{stem}.toml"
    known = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.toml")})
    hint = difflib.get_close_matches(stem, known, n=1, cutoff=0.6)
    guess = f"did you mean {hint[0]}? " if hint else ""
    raise UserError(f"{what} {path} not found; {guess}give a path to a .toml file or one of: {', '.join(known)}")


def check_key(schema: Mapping[str, Mapping[str, object]], section: str, key: str | None, where: str) -> None:
    """UserError for an unknown section or key, with the closest known name as a suggestion."""
    if section not in schema:
        hint = difflib.get_close_matches(section, schema, n=1)
        raise UserError(f"{where}: unknown section [{section}]" + (f"; did you mean [{hint[0]}]?" if hint else
                        f"; known sections: {', '.join(schema)}"))
    if key is not None and key not in schema[section]:
        hint = difflib.get_close_matches(key, schema[section], n=1)
        raise UserError(f"{where}: unknown key {section}.{key}" + (f"; did you mean {section}.{hint[0]}?" if hint else
                        f"; known keys: {', '.join(schema[section])}"))
