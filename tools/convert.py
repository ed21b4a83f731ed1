#!/usr/bin/env python
"""Convert an official DETR / Deformable-DETR / DINO or a Hugging Face checkpoint into a detr_kit checkpoint.

    python tools/convert.py detr-r50-e632da11.pth --out weights/detr_r50_coco.pth
    python tools/convert.py r50_deformable_detr_plus_iterative_bbox_refinement-checkpoint.pth --out weights/ddetr_refine.pth
    python tools/convert.py detr-r50-dc5-f0fb7ef5.pth --out weights/detr_dc5.pth          # "dc5" in the name -> DC5
    python tools/convert.py checkpoint0011_4scale.pth --out weights/dino_4scale.pth       # IDEA-Research/DINO
    python tools/convert.py path/to/hf_save_pretrained_folder --out weights/hf_detr.pth --config configs/detr_r50.yaml

    python tools/convert.py --to-attention runs/vit_two_phase_phase1/last.pth --out runs/vit_two_phase_phase1/attention.pth

The variant (DETR / DC5 / R101 / Deformable single- or multi-scale, +refine, +two-stage, DINO 4- or 5-scale) is
read from the keys.
The config is --config, or the matching configs/*.yaml, with the detected values (classes, queries, layers,
backbone, ...) applied on top. The label map is COCO's 91-slot layout of the released models (label ==
category id, "N/A" for unused ids), or the Hugging Face config's id2label when it has one. The result loads
with tools/eval.py, tools/infer.py, ``Detector.from_checkpoint`` and ``train.init_from``.

``--to-attention`` converts instead a detr_kit checkpoint of phase 1 of two-phase ViT training (convolutional
attention, ``model.backbone.vit.conv_radius >= 1``) into phase 2 (self-attention with a relative position bias
that reproduces it; ``detr_kit/compat/two_phase.py``), for ``train.init_from`` of configs/vit_two_phase_phase2.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="official .pth, Hugging Face folder / .safetensors / .bin")
    parser.add_argument("--out", required=True, help="the detr_kit checkpoint to write (.pth)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--config", default=None, help="base config (default: configs/*.yaml matching the variant)")
    parser.add_argument(
        "--dilation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DC5 backbone (the weights cannot tell); default: the checkpoint's args, else 'dc5' in the file name",
    )
    parser.add_argument("--to-attention", action="store_true",
                        help="source is a phase-1 detr_kit checkpoint (convolutional-attention ViT): write phase 2")
    parser.add_argument("--bias-magnitude", type=_positive_float, default=10.0,
                        help="--to-attention: β of the one-hot relative position bias (off-target weight ~4e^-β)")
    parser.add_argument("--trusted", action="store_true", help="allow arbitrary pickled objects in the source")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return parser.parse_args(argv)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def default_config(overrides: dict) -> Path:
    """The configs/*.yaml closest to the detected variant (the overrides set every architecture field anyway)."""
    if "model.deformable" in overrides:  # set to None: DETR
        names = ["detr_r50.yaml"]
    elif overrides.get("model.deformable.mixed_query_selection") or overrides.get("model.deformable.dn_number"):
        five_scale = overrides.get("model.deformable.num_backbone_levels") == 4
        names = ["dino_r50_5scale.yaml" if five_scale else "dino_r50_4scale.yaml", "deformable_detr_two_stage.yaml"]
    elif overrides.get("model.deformable.two_stage"):
        names = ["deformable_detr_two_stage.yaml", "deformable_detr_refine.yaml", "deformable_detr.yaml"]
    elif overrides.get("model.deformable.box_refine"):
        names = ["deformable_detr_refine.yaml", "deformable_detr.yaml"]
    else:
        names = ["deformable_detr.yaml"]
    for name in names + ["detr_r50.yaml"]:
        if (CONFIGS / name).is_file():
            return CONFIGS / name
    raise FileNotFoundError(f"no base config found in {CONFIGS}; pass one with --config")


def label_map_for(num_classes: int, hf_config: dict | None):
    from detr_kit.compat import coco_label_map
    from detr_kit.structures import LabelMap

    id2label = (hf_config or {}).get("id2label")
    if id2label and len(id2label) == num_classes:
        names = {int(k): str(v) for k, v in id2label.items()}
        return LabelMap(tuple(range(num_classes)), tuple(names.get(i, "N/A") for i in range(num_classes)))
    if num_classes == 91:
        return coco_label_map()
    return LabelMap(tuple(range(num_classes)), tuple(f"class_{i}" for i in range(num_classes)))


def verify(cfg, state_dict, config_name: str) -> None:
    """Load the weights strictly into the model the config builds (on the meta device: no memory, no time).

    Raises:
        CheckpointError: the weights do not fit that model.
    """
    import torch

    from detr_kit.build import build_model
    from detr_kit.errors import CheckpointError

    with torch.device("meta"):
        model = build_model(cfg)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        first = (str(err).splitlines()[1:2] or [str(err)])[0].strip()[:160]
        raise CheckpointError(f"the converted weights do not fit the model {config_name} builds ({first})",
                              "pass the matching config with --config, or leave --config out") from err


def convert(source: str, out: str, config: str | None = None, dilation: bool | None = None, trusted: bool = False) -> Path:
    """Convert ``source`` and write the detr_kit checkpoint ``out``; returns its path.

    Raises:
        CheckpointError: unreadable source, a detr_kit checkpoint already, keys no conversion rule knows, or
            weights that do not fit the config.
        ConfigError: an invalid --config.
    """
    from detr_kit.compat import (
        checkpoint_state_dict,
        detect_checkpoint_format,
        detect_hf_variant,
        detect_official_variant,
        overrides_to_strings,
        read_checkpoint,
        read_hf_config,
    )
    from detr_kit.config import load_config
    from detr_kit.engine.checkpoint import save_checkpoint
    from detr_kit.errors import CheckpointError

    checkpoint = read_checkpoint(source, trusted=trusted)
    fmt = detect_checkpoint_format(checkpoint)
    if fmt == "detr_kit":
        raise CheckpointError(f"{source} already is a detr_kit checkpoint (or has no official / Hugging Face keys)",
                              "use it as it is with tools/eval.py, tools/infer.py or train.init_from")
    if dilation is None and "dc5" in Path(source).name.lower():
        dilation = True
    hf_config = read_hf_config(source) if fmt == "hf" else None
    if fmt == "hf" and dilation is not None:
        hf_config = {**(hf_config or {}), "dilation": dilation}
    try:
        if fmt == "hf":
            overrides = detect_hf_variant(checkpoint, hf_config)
        else:
            overrides = detect_official_variant(checkpoint, dilation=dilation)
        _, state_dict = checkpoint_state_dict(checkpoint)
    except ValueError as err:  # the compat converters name the key no rule knows
        raise CheckpointError(f"{source}: {err}", "convert official DETR / Deformable-DETR or Hugging Face "
                              "DetrForObjectDetection / DeformableDetrForObjectDetection checkpoints") from err
    config_path = config or default_config(overrides)
    cfg = load_config(config_path, overrides_to_strings(overrides))
    verify(cfg, state_dict, str(config_path))
    label_map = label_map_for(int(overrides["model.num_classes"]), hf_config)
    state = {
        "model": {k: v.contiguous() for k, v in state_dict.items()},
        "config": cfg.to_dict(),
        "label_map": label_map.to_dict(),
        "id2label": label_map.id2label,
        "epoch": 0,
        "step": 0,
    }
    return save_checkpoint(out, state)


def to_attention(source: str, out: str, bias_magnitude: float, trusted: bool = False) -> Path:
    """Convert a phase-1 checkpoint of two-phase ViT training into phase 2 and write ``out``; returns its path.

    Raises:
        CheckpointError: unreadable source, not a detr_kit phase-1 checkpoint, or weights that do not fit it.
    """
    from detr_kit.compat import detect_checkpoint_format, read_checkpoint
    from detr_kit.compat.two_phase import to_attention_checkpoint
    from detr_kit.engine.checkpoint import save_checkpoint
    from detr_kit.errors import CheckpointError

    checkpoint = read_checkpoint(source, trusted=trusted)
    if detect_checkpoint_format(checkpoint) != "detr_kit" or "config" not in checkpoint:
        raise CheckpointError(f"{source} is not a detr_kit checkpoint",
                              "--to-attention converts what tools/train.py wrote for a phase-1 config")
    state = to_attention_checkpoint(checkpoint, str(source), bias_magnitude)
    record = state["two_phase"]
    print(f"phase 1 (epoch {record['phase1_epoch']}) -> phase 2, β = {bias_magnitude:g}: backbone features differ "
          f"by at most {record['max_feature_difference']:.2e} (float64, random padded batch)")
    return save_checkpoint(out, state)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from detr_kit.engine.outputs import check_output_file
    from detr_kit.errors import ConfigError

    if args.to_attention and (args.config or args.dilation is not None):
        raise ConfigError("--to-attention takes neither --config nor --dilation",
                          "leave them out: the phase-2 config is the checkpoint's own with self-attention")
    check_output_file(args.out, "--out", args.overwrite, inputs=[args.source])  # before reading the source
    if args.config:
        from detr_kit.config import load_config

        load_config(args.config)  # a bad --config fails now, not after reading the source
    if args.to_attention:
        path = to_attention(args.source, args.out, args.bias_magnitude, args.trusted)
    else:
        path = convert(args.source, args.out, args.config, args.dilation, args.trusted)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
