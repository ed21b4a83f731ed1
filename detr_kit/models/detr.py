"""DETR: a backbone, a positional encoding, a transformer and two prediction heads (Carion et al. 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from detr_kit.models.backbone.padding import run_backbone
from detr_kit.models.heads import MLP
from detr_kit.structures import DetectionOutput


class DETR(nn.Module):
    """The DETR detector with softmax class heads (the last class is "no object").

    Args:
        backbone: returns a list of FeatureMap for ``(images, mask)``; has ``channels`` (a tuple, last level used).
        position: maps a mask [B, H, W] to an encoding [B, C, H, W].
        transformer: ``(src, mask, query_embed, pos) -> [D, B, Q, C]``; has ``hidden_dim`` (C).
        num_classes: K, without the no-object class.
        num_queries: Q, the number of object queries.
        aux_loss: return every earlier decoder layer's predictions in ``DetectionOutput.aux``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        position: nn.Module,
        transformer: nn.Module,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_queries < 1:
            raise ValueError(f"num_classes and num_queries must be >= 1, got {num_classes} and {num_queries}")
        hidden_dim = transformer.hidden_dim
        num_pos_feats = getattr(position, "num_pos_feats", None)
        if num_pos_feats is not None and 2 * num_pos_feats != hidden_dim:
            raise ValueError(
                f"the position encoding gives {2 * num_pos_feats} channels but the transformer's hidden_dim is "
                f"{hidden_dim}; build it with num_pos_feats={hidden_dim // 2}"
            )
        self.backbone = backbone
        self.position = position
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.input_proj = nn.Conv2d(backbone.channels[-1], hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, num_layers=3)

    def forward(self, images: Tensor, mask: Tensor | None = None, exact_padding: bool = False) -> DetectionOutput:
        """Detect objects.

        Args:
            images: [B, 3, H, W] float, normalised, padded to the largest image.
            mask: [B, H, W] bool, True on padding; None means no padding.
            exact_padding: run the backbone on each image unpadded, so that an image's outputs do not depend on the
                batch (evaluation; see ``run_backbone``).

        Returns:
            DetectionOutput with logits [B, Q, K + 1], boxes [B, Q, 4] cxcywh in 0..1 of the unpadded image, and
            (with aux_loss) one (logits, boxes) pair per earlier decoder layer.
        """
        if mask is not None and (mask.shape[0] != images.shape[0] or mask.shape[-2:] != images.shape[-2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(images.shape)}; expected [B, H, W]")
        level = run_backbone(self.backbone, images, mask, exact_padding)[-1]
        src = self.input_proj(level.features)  # [B, C, H_l, W_l]
        pos = self.position(level.mask)  # [B, C, H_l, W_l]
        hidden = self.transformer(src, level.mask, self.query_embed.weight, pos)  # [D, B, Q, C]
        logits = self.class_embed(hidden)  # [D, B, Q, K + 1]
        boxes = self.bbox_embed(hidden).sigmoid()  # [D, B, Q, 4]
        aux = tuple(zip(logits[:-1], boxes[:-1])) if self.aux_loss else ()
        return DetectionOutput(logits[-1], boxes[-1], aux)


__all__ = ["DETR"]
