"""The transformer layers' feed-forward block, ``linear2(dropout(relu(linear1(x))))``, computed leanly.

- ReLU and dropout are one op that keeps only its output for backward (``ops.dropout.relu_dropout``), written
  over ``linear1``'s output (a fresh tensor nothing else reads), which is computed on the flattened rows so that it
  is a base tensor: in place on the ``[B, S, F]`` view of a 2-D matmul result, autograd would rebase the view's
  history and copy the whole gradient (``CopySlices``) in backward.
- Without autograd on the CPU, large inputs run in chunks of rows: the hidden is made and consumed in cache,
  instead of one ``[N, dim_feedforward]`` buffer (73 MB for Deformable-DETR's encoder at 800x1066) paged in fresh.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_kit.ops.dropout import relu_dropout

INFERENCE_ROWS = 2048
"""Feed-forward rows per chunk without autograd on the CPU (hidden 8 MB at dim_feedforward 1024)."""


class ReLUDropout(nn.Module):
    """``dropout(relu(x))`` keeping only its output for backward (see ``ops.dropout.relu_dropout``).

    Args:
        p: drop probability in [0, 1).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:  # [...] -> [...]
        return relu_dropout(x, self.p, self.training, inplace=inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _chunked(rows: Tensor, linear2: nn.Linear) -> bool:
    """Whether ``rows`` [N, C] run in chunks: no autograd, CPU, no autocast, not traced or compiled, a bias to
    ``addmm`` into, and more than two chunks of rows."""
    return (
        rows.shape[0] > 2 * INFERENCE_ROWS
        and linear2.bias is not None
        and not torch.is_grad_enabled()
        and rows.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


def feed_forward(x: Tensor, linear1: nn.Linear, activation: ReLUDropout, linear2: nn.Linear) -> Tensor:
    """``linear2(activation(linear1(x)))`` over the rows of ``x``: [..., C] -> [..., C]."""
    rows = x.reshape(-1, x.shape[-1])  # [N, C]
    if _chunked(rows, linear2):
        out = rows.new_empty(rows.shape[0], linear2.out_features)  # [N, C]
        for start in range(0, rows.shape[0], INFERENCE_ROWS):
            stop = min(start + INFERENCE_ROWS, rows.shape[0])
            hidden = activation(linear1(rows[start:stop]), inplace=True)  # [n, dim_feedforward]
            torch.addmm(linear2.bias, hidden, linear2.weight.t(), out=out[start:stop])
        return out.view(*x.shape[:-1], linear2.out_features)
    hidden = activation(linear1(rows), inplace=True)  # [N, dim_feedforward]
    return linear2(hidden).view(*x.shape[:-1], linear2.out_features)  # [..., C]


__all__ = ["INFERENCE_ROWS", "ReLUDropout", "feed_forward"]
