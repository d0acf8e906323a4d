"""The layers' weighted sums of tokens, as a module of their own so that fp16 graphs can tell them apart.

A weighted sum whose weights are normalised (each output's weights sum to at most 1) and whose values are
tokens keeps its precision in fp16 with fp32 accumulation (what the GPU GEMMs of ONNX Runtime and TensorRT
do): every operand is of the order of the result. The clustering's squared distances are not like that (a
difference of large dot products, then sharpened by 1/tau) and stay fp32 with their softmax. Measured by scripts/fp16_split.py on the clustering inputs of three recipes at
their own sizes (scripts/results/fp16_split.json), as the worst centre's cosine to fp32: with these sums in fp16
0.999996 / 0.9986 / 0.9998 (timm ViT-B/16, Depth Anything small, the default DINOv2-S), with the distance GEMM
in fp16 0.93 / 0.93 / 0.98, and for scale with fp32 on tokens carrying a 1e-3 relative noise 0.99999 / 0.995 /
0.992. tests/test_fp16.py::test_clustering_precision_split states the same on synthetic tokens. Normalising the
weights first matters: a nearly empty cluster's raw soft assignments sink below fp16's normal range (6e-5).

An instance's attribute name starts with core.contract.FP16_SAFE_PREFIX ("fp16_"): the exporter records it in
the node scopes, and the fp16 conversion runs those nodes in fp16 inside an otherwise fp32 layer.
"""

from __future__ import annotations

from torch import Tensor, nn


class WeightedSum(nn.Module):
    """w @ x (or w^T @ x when `transposed`): normalised weights times tokens; safe in fp16."""

    def __init__(self, transposed: bool = False):
        super().__init__()
        self.transposed = transposed

    def forward(self, w: Tensor, x: Tensor) -> Tensor:
        return (w.transpose(-1, -2) if self.transposed else w) @ x
