"""DETR's encoder-decoder transformer (Carion et al. 2020), batch-first.

Post-norm layers with ReLU feed-forward blocks; the positional encodings are added to the queries and keys of
every attention layer (never to the values). Module names follow the official code
(``encoder.layers.{i}.self_attn``, ``decoder.layers.{i}.multihead_attn``, ``decoder.norm``, ...), and the attention
modules keep ``nn.MultiheadAttention``'s parameter layout, so official checkpoints load with a key prefix only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters, computed by ``scaled_dot_product_attention``.

    Parameters: ``in_proj_weight`` [3C, C] (query, key, value projections stacked), ``in_proj_bias`` [3C] and
    ``out_proj`` (Linear C -> C), initialised as ``nn.MultiheadAttention`` does.

    Args:
        embed_dim: C.
        num_heads: M; must divide C.
        dropout: dropout probability on the attention weights (training only).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: [B, Lq, C].
            key: [B, Lk, C]; may be the same tensor as ``query`` (then both projections run as one matmul).
            value: [B, Lk, C].
            key_padding_mask: [B, Lk] bool, True for keys to ignore; None attends to every key.
            attn_mask: [Lq, Lk] bool, True where a query must not see a key (``nn.MultiheadAttention``'s
                convention); None lets every query see every key. No row may be all True.

        Returns:
            [B, Lq, C].
        """
        batch, len_q, channels = query.shape
        len_k = key.shape[1]
        heads, head_dim = self.num_heads, channels // self.num_heads
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if key is query:
            q, k = F.linear(query, weight[: 2 * channels], bias[: 2 * channels]).chunk(2, dim=-1)  # [B, Lq, C] x2
        else:
            q = F.linear(query, weight[:channels], bias[:channels])  # [B, Lq, C]
            k = F.linear(key, weight[channels : 2 * channels], bias[channels : 2 * channels])  # [B, Lk, C]
        v = F.linear(value, weight[2 * channels :], bias[2 * channels :])  # [B, Lk, C]
        q = q.view(batch, len_q, heads, head_dim).transpose(1, 2)  # [B, M, Lq, Dh]
        k = k.view(batch, len_k, heads, head_dim).transpose(1, 2)  # [B, M, Lk, Dh]
        v = v.view(batch, len_k, heads, head_dim).transpose(1, 2)  # [B, M, Lk, Dh]
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk], True = attend
        if attn_mask is not None:
            pair_allowed = ~attn_mask  # [Lq, Lk]
            allowed = pair_allowed if allowed is None else allowed & pair_allowed  # [B, 1, Lq, Lk]
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)  # [B, M, Lq, Dh]
        out = out.transpose(1, 2).reshape(batch, len_q, channels)  # [B, Lq, C]
        return self.out_proj(out)


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: self-attention with q = k = src + pos, then a ReLU feed-forward block.

    Args:
        hidden_dim: C.
        num_heads: M.
        dim_feedforward: hidden size of the feed-forward block.
        dropout: dropout on every residual branch (DETR: 0.1).
        attention_dropout: dropout on the attention weights; None = ``dropout``.
        activation_dropout: dropout after the feed-forward ReLU; None = ``dropout``.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(hidden_dim, num_heads, dropout=_or(attention_dropout, dropout))
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = nn.Dropout(_or(activation_dropout, dropout))
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """src [B, S, C], mask [B, S] bool True on padding, pos [B, S, C] -> [B, S, C]."""
        q = _with_pos(src, pos)  # [B, S, C], also the key
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, key_padding_mask=mask)))
        hidden = self.dropout(F.relu(self.linear1(src)))  # [B, S, dim_feedforward]
        return self.norm2(src + self.dropout2(self.linear2(hidden)))


class TransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, cross-attention to the memory, ReLU feed-forward block.

    Args:
        hidden_dim: C.
        num_heads: M.
        dim_feedforward: hidden size of the feed-forward block.
        dropout: dropout on every residual branch (DETR: 0.1).
        attention_dropout: dropout on the attention weights; None = ``dropout``.
        activation_dropout: dropout after the feed-forward ReLU; None = ``dropout``.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(hidden_dim, num_heads, dropout=_or(attention_dropout, dropout))
        self.multihead_attn = MultiheadAttention(hidden_dim, num_heads, dropout=_or(attention_dropout, dropout))
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = nn.Dropout(_or(activation_dropout, dropout))
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, tgt: Tensor, memory: Tensor, memory_mask: Tensor | None, pos: Tensor | None, query_pos: Tensor | None
    ) -> Tensor:
        """Update the query states.

        Args:
            tgt: [B, Q, C] query states.
            memory: [B, S, C] encoder output.
            memory_mask: [B, S] bool, True on padding.
            pos: [B, S, C] positional encoding of the memory.
            query_pos: [B, Q, C] learned query embeddings.

        Returns:
            [B, Q, C].
        """
        q = _with_pos(tgt, query_pos)  # [B, Q, C], also the key
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt)))
        attended = self.multihead_attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), memory, key_padding_mask=memory_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))  # [B, Q, C]
        hidden = self.dropout(F.relu(self.linear1(tgt)))  # [B, Q, dim_feedforward]
        return self.norm3(tgt + self.dropout3(self.linear2(hidden)))


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of ``layer`` (post-norm: no final norm)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, mask: Tensor | None, pos: Tensor | None) -> Tensor:  # [B, S, C] -> [B, S, C]
        for layer in self.layers:
            src = layer(src, mask, pos)
        return src


class TransformerDecoder(nn.Module):
    """A stack of ``num_layers`` copies of ``layer``; every layer's output passes through the shared final norm."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(
        self, tgt: Tensor, memory: Tensor, memory_mask: Tensor | None, pos: Tensor | None, query_pos: Tensor | None
    ) -> Tensor:
        """tgt [B, Q, C], memory [B, S, C] -> [D, B, Q, C], the normalised output of every layer."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_mask, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)  # [D, B, Q, C]


class Transformer(nn.Module):
    """DETR's transformer: a post-norm encoder over the flattened feature map and a decoder over the object queries.

    Args:
        hidden_dim: C (DETR: 256).
        num_heads: M (DETR: 8).
        num_encoder_layers: encoder depth (DETR: 6; 0 skips the encoder).
        num_decoder_layers: decoder depth D (DETR: 6).
        dim_feedforward: hidden size of the feed-forward blocks (DETR: 2048).
        dropout: dropout probability (DETR: 0.1).
        attention_dropout: dropout on the attention weights; None = ``dropout``.
        activation_dropout: dropout after the feed-forward ReLU; None = ``dropout``.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if num_encoder_layers < 0 or num_decoder_layers < 1:
            raise ValueError(
                f"need num_encoder_layers >= 0 and num_decoder_layers >= 1, got {num_encoder_layers} and {num_decoder_layers}"
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        dropouts = dict(dropout=dropout, attention_dropout=attention_dropout, activation_dropout=activation_dropout)
        encoder_layer = TransformerEncoderLayer(hidden_dim, num_heads, dim_feedforward, **dropouts)
        decoder_layer = TransformerDecoderLayer(hidden_dim, num_heads, dim_feedforward, **dropouts)
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, hidden_dim)
        for parameter in self.parameters():  # the reference initialisation
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """Encode the feature map and decode the queries.

        Args:
            src: [B, C, H, W] projected backbone features.
            mask: [B, H, W] bool, True on padding.
            query_embed: [Q, C] learned query embeddings (the decoder's query positions; states start at zero).
            pos: [B, C, H, W] positional encoding of ``src``.

        Returns:
            [D, B, Q, C]: every decoder layer's output after the shared final LayerNorm.
        """
        batch = src.shape[0]
        # Contiguous once here, so that no layer reads (or copies) a transposed view.
        src = src.flatten(2).transpose(1, 2).contiguous()  # [B, S, C]
        pos = pos.flatten(2).transpose(1, 2).to(src.dtype).contiguous()  # [B, S, C]
        mask = mask.flatten(1)  # [B, S]
        query_pos = query_embed[None].expand(batch, -1, -1)  # [B, Q, C]
        tgt = torch.zeros_like(query_pos)  # [B, Q, C]
        memory = self.encoder(src, mask, pos)  # [B, S, C]
        return self.decoder(tgt, memory, mask, pos, query_pos)  # [D, B, Q, C]


__all__ = [
    "MultiheadAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
