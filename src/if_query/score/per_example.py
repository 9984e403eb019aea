"""A tracked linear layer's per-example gradient from its token factors: the maths the engine and the lambda stage
share (the factor files' conventions: :mod:`if_query.kron`).

For a layer of weight (out, in), an example's token factors are its layer inputs A (T, in) and output gradients
G (T, out); with a bias, A gets a column of ones (the *bias column*, in' = in + 1), so the gradient of weight and
bias together is ``Gᵀ [A, 1]`` (out, in'), of rank at most T. In the eigenbasis of the factors it is
``Q_gᵀ (Gᵀ [A, 1]) Q_a``, formed either by rotating the T token vectors (2 T (out² + in'²) FLOPs) or by rotating
the summed gradient (2 out in' (out + in')), whichever is cheaper (:func:`rotate_tokens`).
"""

from __future__ import annotations

import torch


def with_bias_column(inputs: torch.Tensor, bias: bool) -> torch.Tensor:
    """``[A, 1]`` (..., in + 1) when the layer has a bias, ``A`` (..., in) itself otherwise."""
    return torch.cat([inputs, inputs.new_ones(*inputs.shape[:-1], 1)], dim=-1) if bias else inputs


def rotate_tokens(tokens: int, out: int, width: int) -> bool:
    """Whether rotating the ``tokens`` token vectors is cheaper than rotating their summed gradient."""
    return tokens * (out * out + width * width) <= out * width * (out + width)


