"""Backbones: torchvision ResNets and plain ViTs, each returning one FeatureMap per level."""
