"""Parity and fidelity (`checks`), interleaved timing (`timing`), ONNX Runtime's per-node profile by part
(`profile`), FLOPs of the PyTorch models (`flops`), photos as tensors (`images`), report.json / report.md and
the verdicts (`report`).
"""
