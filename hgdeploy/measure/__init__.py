"""Parity and fidelity (`checks`), interleaved timing (`timing`), FLOPs of the PyTorch
models (`flops`), photos as tensors (`images`), report.json / report.md and the verdicts (`report`).
"""
