"""hgdeploy: make a trained vision transformer cheaper without fine-tuning, deploy it, prove the result.

The package is a stack of rooms, one folder each (ARCHITECTURE.md is their map). A module imports its own
room and the rooms below it, never one above; `tests/test_architecture.py` checks every import against
this order, which is the one place it is written.
"""

# The rooms, lowest first: every folder of the package is one, and nothing else is.
ROOMS = ("core", "layers", "models", "spans", "families", "patch", "graph", "backends", "measure", "pipeline",
         "evaluation", "tune", "cli")
