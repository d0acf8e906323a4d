"""Run the unpatched model once per image and replay its first blocks into patched copies.

A sweep scores dozens of plans on the same images. Every plan that clusters after alpha layers computes
exactly the unpatched model's first alpha blocks (patching never changes a weight, and `structural_copy`
shares the tensors), so their answers are recorded once and each patched copy's first alpha blocks return
them instead of running. Blocks are matched by the parameter tensors they share with the unpatched model,
which holds for every family whatever its module layout.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hgdeploy.spans.vit import ClusteredSpan


def _first_param(module: nn.Module) -> int | None:
    p = next(module.parameters(), None)
    return None if p is None else id(p)


def clustered_span(patched: nn.Module) -> ClusteredSpan:
    return next(m for m in patched.modules() if isinstance(m, ClusteredSpan))


def find_blocks(baseline: nn.Module, patched: nn.Module, alpha: int, depth: int) -> Sequence[nn.Module]:
    """The unpatched model's block list: `depth` blocks whose block `alpha` is the first one inside the
    patched copy's clustered span (it shares that block's weights)."""
    first = _first_param(clustered_span(patched).blocks[0])
    for module in baseline.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) == depth \
                and _first_param(module[alpha]) == first:
            return module
    raise ValueError(f"no list of {depth} blocks in {type(baseline).__name__} matches the patched model's span")


class PrefixCache:
    """The unpatched model's outputs on each image and the answers of its first `upto` blocks."""

    def __init__(self, baseline: nn.Module, blocks: Sequence[nn.Module], images: Tensor, names: Sequence[str],
                 upto: int):
        self.blocks = list(blocks)[:upto]
        self.names = tuple(names)
        self.images = images
        self.answers: list[list[Any]] = []
        self.outputs: list[dict[str, np.ndarray]] = []
        recorded: list[Any] = []
        hooks = [b.register_forward_hook(lambda m, i, out: recorded.append(out)) for b in self.blocks]
        try:
            with torch.no_grad():
                for i in range(images.shape[0]):
                    recorded.clear()
                    out = baseline(images[i:i + 1])
                    self.answers.append(list(recorded))
                    self.outputs.append(dict(zip(self.names, (o.numpy() for o in out))))
        finally:
            for h in hooks:
                h.remove()

    @property
    def upto(self) -> int:
        return len(self.blocks)

    def answer(self, image: int, block: int) -> Any:
        return self.answers[image][block]

    @contextlib.contextmanager
    def replaying(self, patched: nn.Module, alpha: int) -> Iterator[list[int]]:
        """Within the block, `patched`'s first alpha blocks answer from the cache for the image whose index
        is the yielded list's one element (set it before each forward)."""
        if alpha > self.upto:
            raise ValueError(f"blocks recorded up to {self.upto}, alpha is {alpha}")
        wanted = {(type(b), _first_param(b)): i for i, b in enumerate(self.blocks[:alpha])}
        current = [0]
        swapped: list[nn.Module] = []
        for module in patched.modules():
            i = wanted.get((type(module), _first_param(module)))
            if i is not None:
                module.forward = (lambda i: lambda *args, **kwargs: self.answers[current[0]][i])(i)
                swapped.append(module)
        if len(swapped) != alpha:
            for m in swapped:
                del m.forward
            raise ValueError(f"found {len(swapped)} of the {alpha} blocks before clustering in the patched model")
        try:
            yield current
        finally:
            for m in swapped:
                del m.forward

    def run(self, patched: nn.Module, alpha: int) -> list[dict[str, np.ndarray]]:
        """`patched`'s outputs on every image, its first alpha blocks replayed."""
        outputs = []
        with self.replaying(patched, alpha) as current, torch.no_grad():
            for i in range(self.images.shape[0]):
                current[0] = i
                outputs.append(dict(zip(self.names, (o.numpy() for o in patched(self.images[i:i + 1])))))
        return outputs

    def tokens_at(self, alpha: int, span: ClusteredSpan) -> Tensor:
        """The patch tokens entering the clustering layer after alpha blocks, all images: [B, N, C]."""
        return torch.cat([span.call.hidden(self.answer(i, alpha - 1))[:, span.num_prefix_tokens:]
                          for i in range(len(self.answers))])
