"""Argument groups: each reads and checks its own options and builds the library object a command takes
(Polygraphy's tools/args shape). Commands call them in the order their inputs should be checked, so that
every mistake is named before anything is loaded or written; the recipe is read here, once per command."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the deploy-side commands must run where torch cannot be imported
    from hgdeploy.backends import EngineProfile
    from hgdeploy.core.recipe import Recipe
    from hgdeploy.graph.folder import ExportFolder
    from hgdeploy.measure.images import Photo
    from hgdeploy.tune.space import Budget


def recipe(args: argparse.Namespace) -> Recipe:
    """The recipe (a path or a bundled name) with its --set overrides, validated."""
    from hgdeploy.core.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)


def engine(args: argparse.Namespace, rec: Recipe | None = None, runs_here: bool = True) -> EngineProfile:
    """--engine, validated; it must run on this machine unless `runs_here` is False (an export only needs its
    device and precision). With `rec`, its per-output parity bounds must name the recipe family's outputs."""
    from hgdeploy.backends import load_profile, require_available

    profile = load_profile(args.engine)
    if runs_here:
        require_available(profile)
    if rec is not None:
        from hgdeploy.pipeline.context import check_engine_outputs

        check_engine_outputs(rec, profile)
    return profile


def budget(args: argparse.Namespace) -> Budget:
    """--budget (default: tune's DEFAULT_BUDGET), parsed as `hgdeploy tune` parses it."""
    from hgdeploy.tune.space import DEFAULT_BUDGET, parse_budget

    return parse_budget(args.budget if args.budget is not None else DEFAULT_BUDGET)


def photos(args: argparse.Namespace) -> list[Photo]:
    """--images DIR, every file a readable photo; the bundled sample photos without it."""
    from hgdeploy.measure.images import load_photos

    return load_photos(args.images)


def write_folder(args: argparse.Namespace, rec: Recipe, subfolder: str | None = None) -> Path:
    """--out (default runs/<recipe>[/subfolder]) where this command may write."""
    from hgdeploy.core.files import check_output_folder
    from hgdeploy.graph.folder import output_folder

    default = output_folder(rec.name, None) / subfolder if subfolder else output_folder(rec.name, None)
    return check_output_folder(args.out if args.out is not None else default)


def run_folder(args: argparse.Namespace, rec: Recipe, run_photos: list[Photo]) -> Path:
    """`run`'s --out. Without it: runs/<recipe> for the sample photos, runs/<recipe>-<folder name> for --images DIR,
    so that a run on your photos never replaces the report of the run on the sample photos (or on another folder),
    said on stderr. Any folder that already holds the report of a run on other photos is named before it is
    replaced."""
    from hgdeploy.core import progress
    from hgdeploy.core.files import check_output_folder
    from hgdeploy.graph.folder import output_folder

    if args.out is not None:
        out = check_output_folder(args.out)
    else:
        out = check_output_folder(output_folder(default_run_name(rec.name, args.images), None))
        if args.images is not None:
            progress.info(f"note: no --out: this run on {args.images} writes {out} (the run on the sample photos "
                          f"keeps {output_folder(rec.name, None)}; --out DIR to choose)", markup=False)
    earlier = earlier_images(out)
    names = [p.name for p in run_photos]
    if earlier is not None and earlier != names:
        shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        progress.info(f"note: {out} holds the report of an earlier run on other photos ({len(earlier)}: {shown}); "
                      f"this run replaces it (--out DIR keeps both)", markup=False)
    return out


def default_run_name(recipe_name: str, images: str | None) -> str:
    """runs/ sub-folder of a run without --out: the recipe's name, with the --images folder's name after it."""
    if images is None:
        return recipe_name
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(images).resolve().name).strip("._") or "images"
    return f"{recipe_name}-{tag}"


def earlier_images(out: Path) -> list[str] | None:
    """The photos the report.json already in `out` was made on (None without a readable one)."""
    try:
        images = json.loads((out / "report.json").read_text()).get("images")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(i) for i in images] if isinstance(images, list) else None


def export_folder(args: argparse.Namespace, rec: Recipe, out: Path | None = None, writes: bool = False,
                  engine: EngineProfile | None = None) -> ExportFolder:
    """The export in --out (or `out`): its two graphs there, exported with this recipe's values; with `writes`,
    a folder this command may write into; with `engine`, the graphs that profile runs derived where the export
    (made for another profile) lacks them."""
    from hgdeploy.core.files import check_output_folder
    from hgdeploy.graph.folder import ExportFolder, output_folder

    folder = ExportFolder.open(output_folder(rec.name, out if out is not None else args.out), rec.data)
    if writes:
        check_output_folder(folder.path)
    if engine is not None:
        from hgdeploy.graph.deploy import with_twins

        folder = with_twins(folder, engine)
    return folder


def triton_repo(args: argparse.Namespace, rec: Recipe) -> Path:
    """--repo: where `hgdeploy triton` may write its repository, clear of the export it serves (--out)."""
    from hgdeploy.graph.folder import output_folder
    from hgdeploy.pipeline.triton import check_repository

    return check_repository(args.repo, output_folder(rec.name, args.out))
