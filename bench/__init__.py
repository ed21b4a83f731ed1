"""Benchmarks of detr_kit against its peers; see bench/__main__.py."""
