"""hgdeploy: make a trained vision transformer cheaper without fine-tuning, deploy it, prove the result.

The package is a stack of rooms, one folder each (ARCHITECTURE.md is their map). A module imports its own
room and the rooms below it, never one above; `tests/test_architecture.py` checks every import against
this order, which is the one place it is written.

The package itself is the public API above every room: the names in `__all__`, each imported from its room
only when first read (`import hgdeploy` imports no module of its own, so the deploy side stays free of torch).
scripts/ use these names only.
"""

import importlib

# The rooms, lowest first: every folder of the package is one, and nothing else is.
ROOMS = ("core", "layers", "models", "spans", "families", "patch", "graph", "backends", "measure", "pipeline",
         "evaluation", "tune", "cli")

# Every public name and the module that defines it (read lazily by __getattr__).
PUBLIC = {
    "UserError": "hgdeploy.core.errors", "exit_code": "hgdeploy.core.errors",
    "REPO_ROOT": "hgdeploy.core.config",
    "to_json": "hgdeploy.core.files", "write_atomic": "hgdeploy.core.files",
    "write_atomic_bytes": "hgdeploy.core.files",
    "INPUT_NAME": "hgdeploy.core.contract",
    "machine_memory_gb": "hgdeploy.core.memory",
    "load_recipe": "hgdeploy.core.recipe", "bundled_recipes": "hgdeploy.core.recipe",
    "TokenClustering": "hgdeploy.layers", "TokenReconstruction": "hgdeploy.layers",
    "WeightedSum": "hgdeploy.layers",
    "get_family": "hgdeploy.families.catalogue",
    "build_models": "hgdeploy.patch.models",
    "ExportFolder": "hgdeploy.graph.folder", "write_twins": "hgdeploy.graph.deploy",
    "load_profile": "hgdeploy.backends", "availability": "hgdeploy.backends", "make_runner": "hgdeploy.backends",
    "cuda_gpu_name": "hgdeploy.backends.machine",
    "cosine": "hgdeploy.measure.checks", "token_cosine": "hgdeploy.measure.checks",
    "fidelity": "hgdeploy.measure.checks",
    "count_gflops_fast": "hgdeploy.measure.flops",
    "load_photos": "hgdeploy.measure.images", "sample_photos": "hgdeploy.measure.images",
    "to_batch": "hgdeploy.measure.images",
    "speedup_interval": "hgdeploy.measure.timing", "MIN_ROUNDS": "hgdeploy.measure.timing",
    "speed_band": "hgdeploy.measure.report", "ci_text": "hgdeploy.measure.report",
    "reliability": "hgdeploy.measure.report",
    "load_context": "hgdeploy.pipeline.context",
    "write_deployable": "hgdeploy.pipeline.road",
    "torch_runners": "hgdeploy.pipeline.steps",
    "run": "hgdeploy.pipeline.commands", "export": "hgdeploy.pipeline.commands",
    "check": "hgdeploy.pipeline.commands", "flops": "hgdeploy.pipeline.commands",
    "bench": "hgdeploy.pipeline.commands", "bench_batches": "hgdeploy.pipeline.commands",
    "bench_export": "hgdeploy.pipeline.engines", "time_engines": "hgdeploy.pipeline.engines",
    "time_runners": "hgdeploy.pipeline.engines", "graph_gflops": "hgdeploy.pipeline.engines",
    "backend_info": "hgdeploy.pipeline.engines", "profile_engines": "hgdeploy.pipeline.engines",
    "tables": "hgdeploy.evaluation.report",
    "SAMPLE_LAYOUTS": "hgdeploy.evaluation.samples", "WRITERS": "hgdeploy.evaluation.samples",
    "SAMPLE_RECIPES": "hgdeploy.evaluation.samples",
    "write_saliency": "hgdeploy.evaluation.samples",
    "KIND_LABELS": "hgdeploy.tune.report", "plan_text": "hgdeploy.tune.report", "wins": "hgdeploy.tune.select",
    "Ledger": "hgdeploy.tune.ledger",
    "quiet_libraries": "hgdeploy.core.progress",
}

__all__ = ["ROOMS", *sorted(PUBLIC)]


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (and kept, so later reads are plain lookups)."""
    if name not in PUBLIC:
        raise AttributeError(f"module 'hgdeploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC))
