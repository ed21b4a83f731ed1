"""Config overrides for tiny models (random ResNet-18, 64 channels, 2+2 layers) that tests build in seconds."""

TINY_DETR = [
    "model.num_classes=3",
    "model.backbone.weights=null",
    "model.backbone.name=resnet18",
    "model.backbone.norm=bn",
    "model.hidden_dim=64",
    "model.num_heads=4",
    "model.num_encoder_layers=2",
    "model.num_decoder_layers=2",
    "model.dim_feedforward=128",
    "model.num_queries=20",
    "model.dropout=0.0",
]
TINY_DEFORMABLE = [*TINY_DETR, "model.deformable.num_proposals=20", "model.deformable.num_feature_levels=3"]
