"""How a model's own transformer blocks are called, across library releases."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hgdeploy.core.errors import UserError


@dataclass(frozen=True)
class BlockCall:
    """How a model's own blocks are called and answer, read once at patch time (never per forward).

    Every block is called with the hidden states alone: an attention mask over N tokens has no meaning
    for M clusters, and dense-prediction ViTs attend everywhere. `returns_tuple`: the block answers
    (hidden, ...) as transformers 4.4x layers do, and the model's own loop reads element 0, so modules
    standing in its layer list must answer the same way.
    """

    returns_tuple: bool = False

    def hidden(self, out: Any) -> Tensor:
        """The hidden states in a block's answer."""
        return out[0] if self.returns_tuple else out

    def answer(self, hidden: Tensor) -> Any:
        """Hidden states in the form the model's loop expects from a block."""
        return (hidden,) if self.returns_tuple else hidden


def inspect_block(block: nn.Module) -> BlockCall:
    """Check that `block` can be called with the hidden states alone and find how it answers.

    The signature says whether one argument is enough (other parameters need defaults); one call on a
    zero tensor of the block's width says whether it returns a tuple, which no annotation states reliably.
    """
    params = list(inspect.signature(block.forward).parameters.values())
    required = [p for p in params[1:] if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not params or required:
        raise UserError(f"{type(block).__name__}.forward needs {', '.join(p.name for p in required) or 'no input'} "
                        f"besides the hidden states; this version of the model's library is not supported")
    norms = [m for m in block.modules() if isinstance(m, nn.LayerNorm)]
    if not norms:
        return BlockCall()
    width = norms[0].normalized_shape[-1]
    weight = next(block.parameters())
    with torch.no_grad():
        out = block(torch.zeros(1, 2, width, dtype=weight.dtype, device=weight.device))
    return BlockCall(returns_tuple=isinstance(out, tuple))
