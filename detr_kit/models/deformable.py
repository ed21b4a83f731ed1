"""Deformable-DETR's multi-scale deformable attention and encoder-decoder (Zhu et al. 2021), batch-first.

Semantics and parameter names follow the reference implementation (fundamentalvision/Deformable-DETR), so its
checkpoints load with a key prefix only: ``encoder.layers.{i}.{self_attn,norm1,linear1,linear2,norm2}``,
``decoder.layers.{i}.{cross_attn,norm1,self_attn,norm2,linear1,linear2,norm3}``, ``level_embed``,
``reference_points`` and, for two-stage, ``enc_output``, ``enc_output_norm``, ``pos_trans``, ``pos_trans_norm``.

Reference points and box proposals live in coordinates normalised to each image's *valid* (unpadded) region;
the valid ratios rescale them to the padded maps, which makes the outputs independent of batch padding.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from detr_kit.models.transformer import MultiheadAttention, feed_forward
from detr_kit.ops.dropout import dropout
from detr_kit.ops.layer_norm import OutputSavingLayerNorm
from detr_kit.ops.deform_attn import ms_deform_attn

_PROPOSAL_MIN_WH = 0.05  # two-stage proposal size on the finest level, doubled per level (the reference's value)
_PROPOSAL_VALID_RANGE = (0.01, 0.99)  # proposals with any coordinate outside are masked (the reference's range)
_PROPOSAL_TEMPERATURE = 10000.0  # sine embedding of the top-k proposals


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), with x clamped to [0, 1] and both x and 1 - x clamped to >= eps (the reference's helper)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (sampling locations need it), else the input's own dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def pixel_grid(spatial_shapes: Sequence[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pixel centres of every level, made afresh for each call (a cache kept across calls would hold tensors
    of whatever mode filled it, e.g. inference tensors that a later training step cannot save for backward).

    Returns:
        centres [S, 2] (x, y) in pixels of their level, the level of each position [S] int64, (w, h) per level
        [L, 2] float32 and the level start index [L] int64.
    """
    centres, levels = [], []
    for level, (height, width) in enumerate(spatial_shapes):
        ys = torch.arange(height, dtype=torch.float32, device=device) + 0.5  # [h]
        xs = torch.arange(width, dtype=torch.float32, device=device) + 0.5  # [w]
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # [h*w, 2] (x, y)
        centres.append(grid)
        levels.append(torch.full((height * width,), level, dtype=torch.int64, device=device))
    sizes = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=device)  # [L, 2]
    areas = torch.tensor([h * w for h, w in spatial_shapes], dtype=torch.int64, device=device)  # [L]
    start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])  # [L]
    return torch.cat(centres), torch.cat(levels), sizes, start


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al. 2021, eq. 3).

    Every query predicts ``num_points`` sampling offsets and attention weights per head and level around its
    reference point; the weights are normalised with a softmax over the ``num_levels * num_points`` samples of a
    head.

    Args:
        hidden_dim: C; must be divisible by ``num_heads``.
        num_levels: L, feature levels.
        num_heads: M.
        num_points: P, sampling points per head and level.

    Raises:
        ValueError: if ``hidden_dim`` is not divisible by ``num_heads`` or a count is < 1.
    """

    def __init__(self, hidden_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4) -> None:
        super().__init__()
        if min(hidden_dim, num_levels, num_heads, num_points) < 1:
            raise ValueError(
                f"MSDeformAttn needs positive sizes, got hidden_dim={hidden_dim}, num_levels={num_levels}, "
                f"num_heads={num_heads}, num_points={num_points}"
            )
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by num_heads {num_heads}")
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(hidden_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(hidden_dim, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        # sampling_offsets' rows in axis-major order (m, axis, l, p); its own order (m, l, p, axis) is the
        # official checkpoints'. Projecting with the reordered rows gives the sampling locations the x and y
        # planes the deformable core reads, with no transposing copy and no elementwise op over size-2 rows.
        m, axis, level, point = torch.meshgrid(
            *(torch.arange(n) for n in (num_heads, 2, num_levels, num_points)), indexing="ij"
        )
        rows = ((m * num_levels + level) * num_points + point) * 2 + axis  # [M, 2, L, P]
        self.register_buffer("axis_major_rows", rows.flatten(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: offsets start on a circle of directions, one per head, at distance 1..P."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)  # [M]
        directions = torch.stack([angles.cos(), angles.sin()], -1)  # [M, 2]
        directions = directions / directions.abs().max(-1, keepdim=True).values  # on the square's border
        grid = directions[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)  # [M, L, P, 2]
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Tensor | None = None,
        padding_mask: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """Attend from every query to sampled points of all levels.

        Args:
            query: [B, Lq, C] queries (with their positional encoding added, unless ``query_pos`` is given).
            reference_points: [B, Lq, L, 2] points (x, y) or [B, Lq, L, 4] boxes (cx, cy, w, h), normalised to each
                level's padded map (0..1). Offsets are divided by the level's (w, h) for points, and scaled by
                ``0.5 * box wh / P`` for boxes.
            value_input: [B, S, C] flattened features of all levels.
            spatial_shapes: (h, w) of each of the L levels; their areas sum to S.
            level_start_index: [L] start of each level in S (passed to the op; optional).
            padding_mask: [B, S] bool, True on padding; those values are zeroed.
            query_pos: [B, Lq, C] positional encoding added to ``query`` here; in training the sum is recomputed
                in backward rather than kept (one [B, Lq, C] tensor less per layer).

        Returns:
            [B, Lq, C].

        Raises:
            ValueError: if ``reference_points`` is not [B, Lq, L, 2 or 4] or the level count differs.
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must be [B, Lq, L, 2] points or [B, Lq, L, 4] boxes, got {tuple(reference_points.shape)}"
            )
        if reference_points.shape[2] != levels or len(spatial_shapes) != levels:
            raise ValueError(
                f"MSDeformAttn was built for {levels} levels, got reference_points {tuple(reference_points.shape)} "
                f"and {len(spatial_shapes)} spatial shapes"
            )
        value = self.value_proj(value_input)  # [B, S, C]
        if padding_mask is not None:  # in place: the projection's output is not needed by its backward
            value = value.masked_fill_(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.hidden_dim // heads)  # [B, S, M, Dh]

        dtype = _compute_dtype(query)
        offset_weight = self.sampling_offsets.weight[self.axis_major_rows]  # [M*2*L*P, C]
        offset_bias = self.sampling_offsets.bias[self.axis_major_rows]  # [M*2*L*P]
        if query_pos is not None and torch.is_grad_enabled() and not torch.is_autocast_enabled(query.device.type):
            # Both projections of (query + query_pos) in one matmul that keeps the two addends, not their sum.
            weight = torch.cat([offset_weight, self.attention_weights.weight])  # [M*L*P*3, C]
            bias = torch.cat([offset_bias, self.attention_weights.bias])  # [M*L*P*3]
            offsets, weights = _LinearOfSum.apply(query, query_pos, weight, bias).split(
                [self.sampling_offsets.out_features, self.attention_weights.out_features], dim=-1
            )
        else:
            query = query if query_pos is None else query + query_pos  # [B, Lq, C]
            offsets, weights = F.linear(query, offset_weight, offset_bias), self.attention_weights(query)
        offsets = offsets.to(dtype).view(batch, num_queries, heads, 2, levels, points)  # x and y planes
        weights = weights.to(dtype).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)  # [B, Lq, M, L, P]
        # Origin and scale are spelled out over the points (1/M of the locations' size), so that the addcmul runs
        # over contiguous rows of 2*L*P in every operand; broadcasting them over P left 4-element inner loops.
        reference_points = reference_points.to(dtype).transpose(2, 3)  # [B, Lq, 2 or 4, L]
        per_point = (batch, num_queries, 1, 2, levels, points)
        if reference_points.shape[2] == 2:
            origin = reference_points[:, :, None, :, :, None].expand(per_point).contiguous()  # [B, Lq, 1, 2, L, P]
            # 1 / (w, h) per level: an offset of 1 moves one pixel of that level.
            sizes = torch.tensor([[w for _, w in spatial_shapes], [h for h, _ in spatial_shapes]], dtype=dtype)
            scale = (1.0 / sizes)[:, :, None].expand(2, levels, points).contiguous().to(query.device)  # [2, L, P]
        else:
            origin = reference_points[:, :, None, :2, :, None].expand(per_point).contiguous()  # box centres
            scale = (reference_points[:, :, None, 2:, :, None] * (0.5 / points)).expand(per_point).contiguous()
        # [B, Lq, M, L, P, 2], a view of x and y planes ([B, Lq, M, 2, L, P] in memory)
        locations = torch.addcmul(origin, offsets, scale).permute(0, 1, 2, 4, 5, 3)
        out = ms_deform_attn(value, spatial_shapes, locations, weights)  # [B, Lq, C]
        return self.output_proj(out)


class _LinearOfSum(torch.autograd.Function):
    """``F.linear(a + b, weight, bias)`` that keeps ``a`` and ``b`` (kept by other ops anyway) instead of ``a + b``."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """a, b [..., C] (b may broadcast), weight [N, C], bias [N] -> [..., N]."""
        ctx.save_for_backward(a, b, weight)
        return F.linear(a + b, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        a, b, weight = ctx.saved_tensors
        need_a, need_b, need_weight, need_bias = ctx.needs_input_grad
        grad_rows = grad.reshape(-1, grad.shape[-1])  # [R, N]
        grad_weight = grad_bias = grad_a = grad_b = None
        if need_weight:
            grad_weight = grad_rows.t() @ (a + b).reshape(-1, weight.shape[1])  # [N, C], the sum recomputed
        if need_bias:
            grad_bias = grad_rows.sum(0)  # [N]
        if need_a or need_b:
            grad_x = grad @ weight  # [..., C]
            grad_a = grad_x.sum_to_size(a.shape) if need_a else None
            grad_b = grad_x.sum_to_size(b.shape) if need_b else None
        return grad_a, grad_b, grad_weight, grad_bias


def _add_residual(x: Tensor, branch: Tensor) -> Tensor:
    """``x + branch``; without autograd the sum is written into ``branch``, which must be a fresh tensor that
    nothing else reads (no new [B, S, C] buffer to page in per residual)."""
    return x + branch if torch.is_grad_enabled() else branch.add_(x)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU feed-forward block.

    Args:
        hidden_dim: C.
        dim_feedforward: hidden size of the feed-forward block (reference: 1024).
        dropout: dropout on the residual branches (the ``nn.Dropout`` attributes hold the
            probabilities; ``detr_kit.ops.dropout`` applies them).
        num_levels: L.
        num_heads: M.
        num_points: P.
    """

    activation_dropout_name = "dropout2"  # the nn.Dropout after the feed-forward ReLU (see set_dropout)

    def __init__(
        self, hidden_dim: int, dim_feedforward: int, dropout: float, num_levels: int, num_heads: int, num_points: int
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(hidden_dim, num_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        # Both norms' outputs are kept for backward by what reads them (the feed-forward block, the next layer's
        # projections, the decoder's value projection), so the norms keep those instead of their inputs.
        self.norm1 = OutputSavingLayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = OutputSavingLayerNorm(hidden_dim)
        self.ffn_checkpointing = False  # set by DeformableEncoder

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """src [B, S, C], pos [B, S, C], reference_points [B, S, L, 2], padding_mask [B, S] -> [B, S, C]."""
        attended = self.self_attn(
            src, reference_points, src, spatial_shapes, level_start_index, padding_mask, query_pos=pos
        )  # [B, S, C], queries src + pos
        training = self.training
        src = self.norm1(_add_residual(src, dropout(attended, self.dropout1.p, training)))
        if self.ffn_checkpointing and training and torch.is_grad_enabled():
            # Keep only the block's input; the [B, S, dim_feedforward] hidden is recomputed in backward (the same
            # dropout mask: checkpoint restores the RNG state the mask is drawn from).
            ffn = checkpoint(self._feed_forward, src, use_reentrant=False)
        else:
            ffn = self._feed_forward(src)
        return self.norm2(_add_residual(src, dropout(ffn, self.dropout3.p, training)))

    def _feed_forward(self, src: Tensor) -> Tensor:
        """[B, S, C] -> [B, S, C]: linear, ReLU, dropout, linear."""
        return feed_forward(src, self.linear1, self.linear2, self.dropout2.p, self.training)


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention (q = k = tgt + query_pos), deformable cross-attention to the
    memory, then a ReLU feed-forward block.

    Args:
        hidden_dim: C.
        dim_feedforward: hidden size of the feed-forward block.
        dropout: dropout on the self-attention weights and on the residual branches (the ``nn.Dropout``
            attributes hold the probabilities; ``detr_kit.ops.dropout`` applies them).
        num_levels: L.
        num_heads: M.
        num_points: P.
    """

    activation_dropout_name = "dropout3"  # the nn.Dropout after the feed-forward ReLU (see set_dropout)

    def __init__(
        self, hidden_dim: int, dim_feedforward: int, dropout: float, num_levels: int, num_heads: int, num_points: int
    ) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(hidden_dim, num_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.self_attn = MultiheadAttention(hidden_dim, num_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> Tensor:
        """tgt [B, Q, C], query_pos [B, Q, C], reference_points [B, Q, L, 2|4], memory [B, S, C] -> [B, Q, C]."""
        q = tgt + query_pos  # [B, Q, C]; the same tensor as key, so q and k project in one matmul
        training = self.training
        tgt = self.norm2(tgt + dropout(self.self_attn(q, q, tgt), self.dropout2.p, training))
        attended = self.cross_attn(
            tgt, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask, query_pos=query_pos
        )  # [B, Q, C], queries tgt + query_pos
        tgt = self.norm1(tgt + dropout(attended, self.dropout1.p, training))
        ffn = feed_forward(tgt, self.linear1, self.linear2, self.dropout3.p, training)  # [B, Q, C]
        tgt = self.norm3(tgt + dropout(ffn, self.dropout4.p, training))
        return tgt


class DeformableEncoder(nn.Module):
    """``num_layers`` copies of ``layer`` (post-norm: no final norm).

    The encoder runs on every pixel of every level, so this is where most of a training step's memory goes. Two
    ways to keep less of it for backward (``torch.utils.checkpoint``; docs/benchmarks.md has the measurements):

    - ``ffn_checkpointing``: recompute only each layer's feed-forward block, whose [B, S, dim_feedforward]
      hidden is the largest tensor a layer keeps (one extra ``linear1`` and ReLU-dropout per layer in backward).
    - ``activation_checkpointing``: recompute whole layers (the least memory, the slowest step).
    """

    def __init__(
        self,
        layer: DeformableEncoderLayer,
        num_layers: int,
        activation_checkpointing: bool = False,
        ffn_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.activation_checkpointing = activation_checkpointing
        for each in self.layers:
            each.ffn_checkpointing = ffn_checkpointing and not activation_checkpointing  # whole layers cover it

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """src [B, S, C], pos [B, S, C], reference_points [B, S, L, 2] -> memory [B, S, C]."""
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                src = checkpoint(layer, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask,
                                 use_reentrant=False)
            else:
                src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DecoderOutput(NamedTuple):
    """hidden_states [D, B, Q, C]; references [D, B, Q, 2|4], the reference each layer attended around (0..1 of the
    valid image); boxes [D, B, Q, 4] cxcywh refined by the decoder's box heads, or None without them."""

    hidden_states: Tensor
    references: Tensor
    boxes: Tensor | None


class DeformableDecoder(nn.Module):
    """``num_layers`` copies of ``layer``, with optional iterative box refinement.

    With ``bbox_embed``, layer ``i``'s box head predicts a correction in inverse-sigmoid space:
    ``box_i = sigmoid(bbox_embed[i](h_i) + logit(reference_i))`` (for 2-d reference points the correction of the
    centre only is added), and the detached ``box_i`` is the next layer's reference.

    Args:
        layer: the layer to copy.
        num_layers: D.
        bbox_embed: None (no refinement) or at least D box heads ``[..., C] -> [..., 4]``; the decoder owns them.
        class_embed: two-stage only: the class heads, of which entry D scores the encoder proposals (kept here, under
            the reference's name, so that reference checkpoints map key for key).

    Raises:
        ValueError: if ``bbox_embed`` has fewer than D heads.
    """

    def __init__(
        self,
        layer: DeformableDecoderLayer,
        num_layers: int,
        bbox_embed: Sequence[nn.Module] | None = None,
        class_embed: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        if bbox_embed is not None and len(bbox_embed) < num_layers:
            raise ValueError(f"bbox_embed needs one box head per decoder layer ({num_layers}), got {len(bbox_embed)}")
        self.bbox_embed = None if bbox_embed is None else nn.ModuleList(bbox_embed)
        self.class_embed = None if class_embed is None else nn.ModuleList(class_embed)

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Tensor,
        valid_ratios: Tensor,
        query_pos: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> DecoderOutput:
        """Decode the queries.

        Args:
            tgt: [B, Q, C] initial query states.
            reference_points: [B, Q, 2] points or [B, Q, 4] boxes, in 0..1 of the valid image.
            memory: [B, S, C] encoder output.
            spatial_shapes: (h, w) per level.
            level_start_index: [L].
            valid_ratios: [B, L, 2] (w, h) fraction of each level's map that is valid.
            query_pos: [B, Q, C].
            memory_padding_mask: [B, S] bool, True on padding.

        Returns:
            DecoderOutput.
        """
        states, references, boxes = [], [], []
        box_ratios = torch.cat([valid_ratios, valid_ratios], -1)  # [B, L, 4]
        for index, layer in enumerate(self.layers):
            ratios = box_ratios if reference_points.shape[-1] == 4 else valid_ratios  # [B, L, 4|2]
            level_references = reference_points[:, :, None] * ratios[:, None].to(reference_points.dtype)  # [B, Q, L, 2|4]
            tgt = layer(tgt, query_pos, level_references, memory, spatial_shapes, level_start_index, memory_padding_mask)
            states.append(tgt)
            references.append(reference_points)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[index](tgt)  # [B, Q, 4]
                if reference_points.shape[-1] == 4:
                    box = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    box = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()
                boxes.append(box)
                reference_points = box.detach()  # [B, Q, 4]; no gradient flows between layers through references
        # References of different layers may differ in size (2-d start, 4-d after refinement): pad points to boxes.
        width = max(r.shape[-1] for r in references)
        references = [r if r.shape[-1] == width else F.pad(r, (0, width - r.shape[-1])) for r in references]
        return DecoderOutput(torch.stack(states), torch.stack(references), torch.stack(boxes) if boxes else None)


class TransformerOutput(NamedTuple):
    """What DeformableTransformer returns.

    hidden_states:  [D, B, Q, C] every decoder layer's output.
    references:     [D, B, Q, 2|4] the reference each layer attended around, 0..1 of the valid image. When the
                    first layer had 2-d points and later ones boxes, the points are zero-padded to 4 values.
    boxes:          [D, B, Q, 4] cxcywh refined by the decoder's box heads, or None without refinement.
    encoder_logits: [B, S, K] two-stage proposal scores, else None.
    encoder_boxes:  [B, S, 4] two-stage proposal boxes cxcywh, else None.
    """

    hidden_states: Tensor
    references: Tensor
    boxes: Tensor | None
    encoder_logits: Tensor | None
    encoder_boxes: Tensor | None


class DeformableTransformer(nn.Module):
    """Deformable-DETR's encoder-decoder over multi-scale feature maps.

    Args:
        hidden_dim: C (reference: 256).
        num_heads: M (8).
        num_encoder_layers: encoder depth (6).
        num_decoder_layers: decoder depth D (6).
        dim_feedforward: feed-forward hidden size (1024).
        dropout: dropout probability (0.1).
        num_feature_levels: L (4).
        enc_points: sampling points per head and level in the encoder (4).
        dec_points: sampling points per head and level in the decoder (4).
        two_stage: take the decoder's reference boxes and queries from the top-scoring encoder proposals.
        num_proposals: two-stage: how many proposals become decoder queries (300).
        bbox_embed: box heads for iterative refinement (D of them, D + 1 for two-stage: entry D regresses the
            encoder proposals), or None. The decoder owns them; they are not re-initialised here.
        class_embed: two-stage: D + 1 class heads (entry D scores the encoder proposals), else None.
        activation_checkpointing: recompute encoder activations in backward (less memory, slower step).
        ffn_checkpointing: recompute only the encoder's feed-forward blocks in backward (see DeformableEncoder).

    Raises:
        ValueError: for inconsistent sizes or missing two-stage heads.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_points: int = 4,
        dec_points: int = 4,
        two_stage: bool = False,
        num_proposals: int = 300,
        bbox_embed: Sequence[nn.Module] | None = None,
        class_embed: Sequence[nn.Module] | None = None,
        activation_checkpointing: bool = False,
        ffn_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_encoder_layers < 1 or num_decoder_layers < 1:
            raise ValueError(f"need >= 1 encoder and decoder layers, got {num_encoder_layers} and {num_decoder_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (the proposal sine embedding splits it), got {hidden_dim}")
        if two_stage and (
            bbox_embed is None or class_embed is None or len(bbox_embed) <= num_decoder_layers or len(class_embed) <= num_decoder_layers
        ):
            raise ValueError(
                f"two_stage needs bbox_embed and class_embed with num_decoder_layers + 1 = {num_decoder_layers + 1} heads "
                "(the last one scores and regresses the encoder proposals)"
            )
        self.hidden_dim = hidden_dim
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.num_proposals = num_proposals
        encoder_layer = DeformableEncoderLayer(hidden_dim, dim_feedforward, dropout, num_feature_levels, num_heads, enc_points)
        decoder_layer = DeformableDecoderLayer(hidden_dim, dim_feedforward, dropout, num_feature_levels, num_heads, dec_points)
        self.encoder = DeformableEncoder(encoder_layer, num_encoder_layers, activation_checkpointing, ffn_checkpointing)
        self.decoder = DeformableDecoder(decoder_layer, num_decoder_layers, bbox_embed, class_embed if two_stage else None)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, hidden_dim))
        if two_stage:
            self.enc_output = nn.Linear(hidden_dim, hidden_dim)
            self.enc_output_norm = nn.LayerNorm(hidden_dim)
            self.pos_trans = nn.Linear(hidden_dim * 2, hidden_dim * 2)
            self.pos_trans_norm = nn.LayerNorm(hidden_dim * 2)
        else:
            self.reference_points = nn.Linear(hidden_dim, 2)
        self._reset_parameters(heads=[*(bbox_embed or ()), *(class_embed or ())])

    def _reset_parameters(self, heads: Sequence[nn.Module]) -> None:
        """The reference initialisation; the heads belong to the detector, which initialises them itself."""
        skip = {id(p) for head in heads for p in head.parameters()}
        for parameter in self.parameters():
            if parameter.dim() > 1 and id(parameter) not in skip:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratios(masks: Sequence[Tensor]) -> Tensor:
        """[B, L, 2] (w, h) fraction of every level's map that the image covers, from masks [B, H_l, W_l]."""
        ratios = []
        for mask in masks:
            valid_h = (~mask[:, :, 0]).sum(1).float() / mask.shape[1]  # [B]
            valid_w = (~mask[:, 0, :]).sum(1).float() / mask.shape[2]  # [B]
            ratios.append(torch.stack([valid_w, valid_h], -1))
        return torch.stack(ratios, 1)

    def proposal_pos_embed(self, proposals_unact: Tensor) -> Tensor:
        """Sine embedding of boxes given as logits: [B, Q, 4] -> [B, Q, 2C] (C/2 features per coordinate)."""
        num_feats = self.hidden_dim // 2
        dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposals_unact.device)
        dim_t = _PROPOSAL_TEMPERATURE ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # [F]
        pos = proposals_unact.float().sigmoid()[..., None] * (2 * math.pi) / dim_t  # [B, Q, 4, F]
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(2)  # [B, Q, 4F]

    def forward(
        self, srcs: Sequence[Tensor], masks: Sequence[Tensor], pos_embeds: Sequence[Tensor], query_embed: Tensor | None
    ) -> TransformerOutput:
        """Encode the levels and decode the queries.

        Args:
            srcs: L feature maps [B, C, H_l, W_l].
            masks: L masks [B, H_l, W_l] bool, True on padding.
            pos_embeds: L positional encodings [B, C, H_l, W_l].
            query_embed: [Q, 2C] (query position, then initial state) when not two-stage; None for two-stage.

        Returns:
            TransformerOutput.

        Raises:
            ValueError: if the number of levels differs from ``num_feature_levels`` or ``query_embed`` is missing.
        """
        if not len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels:
            raise ValueError(
                f"expected {self.num_feature_levels} levels, got {len(srcs)} srcs, {len(masks)} masks, {len(pos_embeds)} pos"
            )
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed [Q, 2C] is required unless two_stage is on")
        batch, channels = srcs[0].shape[:2]
        spatial_shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        centres, level_index, sizes, level_start_index = pixel_grid(spatial_shapes, srcs[0].device)
        # Contiguous [B, S, C] once here, so no layer reads a transposed view.
        src = torch.cat([s.flatten(2) for s in srcs], 2).transpose(1, 2).contiguous()  # [B, S, C]
        mask = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        pos = torch.cat([p.flatten(2) for p in pos_embeds], 2).transpose(1, 2)  # [B, S, C] view
        pos = (pos + self.level_embed[level_index]).to(src.dtype).contiguous()  # [B, S, C]
        # Without padding the layers skip masking their values (one check per forward, not one per layer).
        attention_mask = mask if bool(mask.any()) else None  # [B, S] or None
        valid_ratios = self.valid_ratios(masks)  # [B, L, 2]

        # Reference point of every position: its pixel centre in 0..1 of its level's valid region, then rescaled to
        # every level's padded map.
        valid_sizes = valid_ratios * sizes  # [B, L, 2] valid (w, h) in pixels
        points = centres / valid_sizes[:, level_index]  # [B, S, 2] in 0..1 of the valid image
        encoder_references = points[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]
        memory = self.encoder(src, pos, encoder_references, spatial_shapes, level_start_index, attention_mask)  # [B, S, C]

        encoder_logits = encoder_boxes = None
        if self.two_stage:
            query_pos, tgt, reference_points, encoder_logits, encoder_boxes = self._select_proposals(
                memory, mask, points, level_index
            )
        else:
            query_pos, tgt = query_embed.split(channels, dim=1)  # [Q, C] x2
            query_pos = query_pos[None].expand(batch, -1, -1)  # [B, Q, C]
            tgt = tgt[None].expand(batch, -1, -1)  # [B, Q, C]
            reference_points = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]
        decoded = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_pos, attention_mask
        )
        return TransformerOutput(decoded.hidden_states, decoded.references, decoded.boxes, encoder_logits, encoder_boxes)

    def _select_proposals(
        self, memory: Tensor, mask: Tensor, points: Tensor, level_index: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Two-stage: score one proposal per position and turn the top ``num_proposals`` into decoder queries.

        Returns query_pos [B, Q, C], tgt [B, Q, C], reference boxes [B, Q, 4], encoder logits [B, S, K] and encoder
        boxes [B, S, 4].
        """
        low, high = _PROPOSAL_VALID_RANGE
        wh = _PROPOSAL_MIN_WH * 2.0 ** level_index.to(points.dtype)  # [S]
        proposals = torch.cat([points, wh[None, :, None].expand_as(points)], -1)  # [B, S, 4] cxcywh
        valid = ((proposals > low) & (proposals < high)).all(-1) & ~mask  # [B, S]
        proposals_unact = inverse_sigmoid(proposals).masked_fill(~valid[..., None], float("inf"))  # [B, S, 4]
        output_memory = memory.masked_fill(~valid[..., None], 0.0)  # [B, S, C]
        output_memory = self.enc_output_norm(self.enc_output(output_memory))  # [B, S, C]

        class_head = self.decoder.class_embed[self.decoder.num_layers]
        box_head = self.decoder.bbox_embed[self.decoder.num_layers]
        encoder_logits = class_head(output_memory)  # [B, S, K]
        boxes_unact = box_head(output_memory).to(proposals_unact.dtype) + proposals_unact  # [B, S, 4]
        # The reference ranks by the first class's score (the encoder is trained class-agnostically, label 0).
        # Padding positions are never selected, so padding cannot change which proposals are kept.
        scores = encoder_logits[..., 0].float().masked_fill(mask, float("-inf"))  # [B, S]
        num = min(self.num_proposals, scores.shape[1])
        top = scores.topk(num, dim=1).indices  # [B, Q]
        top_unact = boxes_unact.gather(1, top[..., None].expand(-1, -1, 4)).detach()  # [B, Q, 4]
        reference_points = top_unact.sigmoid()  # [B, Q, 4]
        query = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(top_unact).to(memory.dtype)))  # [B, Q, 2C]
        query_pos, tgt = query.split(self.hidden_dim, dim=-1)  # [B, Q, C] x2
        return query_pos, tgt, reference_points, encoder_logits, boxes_unact.sigmoid()


__all__ = [
    "DecoderOutput",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DeformableTransformer",
    "MSDeformAttn",
    "TransformerOutput",
    "inverse_sigmoid",
    "pixel_grid",
]
