"""CPU deployment latency: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, ours beside transformers'.

    python -m bench.deploy --checkpoint runs/quickstart/best.pth --threads 2 --repeats 3

For each model, in its own process (so one model's memory and a crash stay its own):

- ``quickstart`` (the checkpoint), ``detr_r50`` and ``deformable_r50`` (configs/detr_r50.yaml and
  configs/deformable_detr.yaml, random weights, K = 91): PyTorch eager is the model as ``Detector`` runs it (the fast
  modules, ``torch.inference_mode``); the ONNX file is ``detr_kit.export.export_onnx`` of the plain model, exported
  once with dynamic H and W and run at both sizes; int8 is onnxruntime's dynamic quantization of its MatMul and Gemm
  nodes (the linear layers; weights int8 per tensor, activations quantized at run time).
- ``hf_detr_r50`` and ``hf_deformable_r50``: transformers' DetrForObjectDetection / DeformableDetrForObjectDetection
  built from their default configs with random weights (no downloads), eager and exported the same way
  (``torch.export`` -> ONNX with dynamic H and W, a fixed size per input size when that fails).

Every case runs at 640x640 and 800x1066, batch 1: one warm-up run, then ``--repeats`` timed runs; the median is
reported. Torch and onnxruntime get ``--threads`` intra-op threads. The ONNX outputs are compared with eager's on the
timed input (largest absolute differences). For the quickstart checkpoint the COCO AP of eager, ORT fp32 and ORT int8
is measured on its validation set (``data.val_*`` of its config), so the int8 change in AP is a measured figure.
Prints a Markdown table and the goal check; the records go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((640, 640), (800, 1066))
OURS = {"quickstart": None, "detr_r50": "configs/detr_r50.yaml", "deformable_r50": "configs/deformable_detr.yaml"}
PEERS = ("hf_detr_r50", "hf_deformable_r50")
PEER_OF = {"detr_r50": "hf_detr_r50", "deformable_r50": "hf_deformable_r50"}


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """One warm-up call, then ``repeats`` timed calls: (median seconds, all times)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def ort_session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_linear_layers(fp32: Path, int8: Path) -> None:
    """onnxruntime dynamic quantization of the MatMul and Gemm nodes; the detr_kit metadata is kept."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    source = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    quantized = onnx.load(str(int8))
    present = {p.key for p in quantized.metadata_props}
    for key, value in source.items():
        if key not in present:
            quantized.metadata_props.add(key=key, value=value)
    onnx.save(quantized, str(int8))


class HuggingFaceDetector(nn.Module):
    """transformers' detector behind detr_kit's interface: ``images [B, 3, H, W] -> DetectionOutput`` (no mask)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor):
        from detr_kit.structures import DetectionOutput

        output = self.model(pixel_values=images)
        return DetectionOutput(output.logits, output.pred_boxes, (), None)


def build_peer(key: str) -> nn.Module:
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    if key == "hf_detr_r50":
        model = DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False, num_labels=91))
    else:
        model = DeformableDetrForObjectDetection(DeformableDetrConfig(use_pretrained_backbone=False, num_labels=91))
    return HuggingFaceDetector(model).eval()


def build_ours(key: str, checkpoint: Path | None):
    """(eager model, plain model to export, its cfg, label map)."""
    from detr_kit.build import build_model
    from detr_kit.config import load_config
    from detr_kit.export import build_export_model
    from detr_kit.inference import Detector
    from detr_kit.structures import LabelMap

    if key == "quickstart":
        detector = Detector.from_checkpoint(checkpoint, device="cpu")
        model, cfg, label_map = detector.model, detector.cfg, detector.label_map
    else:
        cfg = load_config(ROOT / OURS[key], ["model.backbone.weights=null"])
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=91).eval()
        label_map = LabelMap(tuple(range(1, 92)), tuple(f"class_{i}" for i in range(1, 92)))
    return model.eval(), build_export_model(cfg, model.state_dict(), len(label_map)), cfg, label_map


def export_files(plain: nn.Module, folder: Path, metadata: dict | None, sizes) -> tuple[dict, str]:
    """ONNX file per input size (the same dynamic file for both when it exports that way) and how it exported."""
    from detr_kit.export import CaptureError, export_onnx

    start = time.perf_counter()
    try:
        export_onnx(plain, folder / "dynamic.onnx", sizes[0], dynamic_size=True, metadata=metadata)
        return {size: folder / "dynamic.onnx" for size in sizes}, f"dynamic H, W ({time.perf_counter() - start:.0f} s)"
    except CaptureError as err:
        reason = str(err)
    files = {}
    for height, width in sizes:
        try:
            files[(height, width)] = export_onnx(plain, folder / f"{height}x{width}.onnx", (height, width),
                                                 dynamic_size=False, metadata=metadata).path
        except CaptureError as err:
            return files, f"does not export: {err}"
    return files, f"fixed H, W only ({reason})"


def ort_error(path: Path, images: Tensor) -> str | None:
    """The first line of onnxruntime's error when it runs the file on ``images``; None when it runs."""
    from detr_kit.export.graph import first_line

    try:
        ort_session(path, 1).run(["logits", "boxes"], {"images": images.numpy()})
    except Exception as err:  # onnxruntime's Fail / InvalidArgument types
        return first_line(err, limit=160)
    return None


def fixed_export(plain: nn.Module, folder: Path, size: tuple[int, int], metadata: dict | None) -> Path:
    from detr_kit.export import export_onnx

    return export_onnx(plain, folder / f"{size[0]}x{size[1]}.onnx", size, dynamic_size=False, metadata=metadata).path


def measure_model(key: str, checkpoint: Path | None, threads: int, repeats: int, sizes) -> list[dict]:
    """Every record of one model: per size, eager and ORT fp32 (and int8 for ours) times and differences."""
    from detr_kit.export import DeploymentInfo

    torch.set_num_threads(threads)
    peer = key in PEERS
    if peer:
        eager_model = plain = build_peer(key)
        metadata, cfg, label_map = None, None, None
    else:
        eager_model, plain, cfg, label_map = build_ours(key, checkpoint)
        metadata = DeploymentInfo.from_config(cfg, label_map).to_metadata()
    records = []
    with tempfile.TemporaryDirectory(prefix=f"deploy_{key}_") as tmp:
        folder = Path(tmp)
        files, how = export_files(plain, folder, metadata, sizes)
        quantized = {}
        if not peer:
            for path in sorted(set(files.values())):
                quantize_linear_layers(path, path.with_name(path.stem + "_int8.onnx"))
                quantized[path] = path.with_name(path.stem + "_int8.onnx")
        for height, width in sizes:
            images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))

            def eager() -> tuple[Tensor, Tensor]:
                with torch.inference_mode():
                    output = eager_model(images)
                return output.logits, output.boxes

            eager_s, eager_runs = median_time(eager, repeats)
            expected = [t.float().numpy() for t in eager()]
            record = {"model": key, "size": [height, width], "export": how, "eager_s": eager_s,
                      "eager_runs": eager_runs}
            reason = ort_error(files[(height, width)], images) if (height, width) in files else None
            if reason is not None:
                # A "dynamic" file that fails at this size (a size frozen in the graph): export this size alone, as
                # tools/export.py falls back, and say so.
                files[(height, width)] = fixed_export(plain, folder, (height, width), metadata)
                record["export"] = f"{how}, but it fails at {height}x{width} ({reason}): fixed-size export here"
                if not peer:
                    quantize_linear_layers(files[(height, width)], folder / f"{height}x{width}_int8.onnx")
                    quantized[files[(height, width)]] = folder / f"{height}x{width}_int8.onnx"
            variants = [("fp32", files.get((height, width)))]
            if (height, width) in files and not peer:
                variants.append(("int8", quantized[files[(height, width)]]))
            for name, path in variants:
                if path is None:
                    continue
                session = ort_session(path, threads)
                feed = {"images": images.numpy()}
                run = lambda session=session: session.run(["logits", "boxes"], feed)  # noqa: E731 (timed as it is)
                record[f"ort_{name}_s"], record[f"ort_{name}_runs"] = median_time(run, repeats)
                got = run()
                record[f"ort_{name}_diff"] = [float(np.abs(g - e).max()) for g, e in zip(got, expected)]
                del session, run  # the session's memory goes before the next file's
            records.append(record)
            print(json.dumps(record), flush=True)
        if key == "quickstart":
            fp32 = files[sizes[0]]
            records.append(measure_ap(eager_model, cfg, label_map, fp32, quantized[fp32], threads))
            print(json.dumps(records[-1]), flush=True)
    return records


def measure_ap(model: nn.Module, cfg, label_map, fp32: Path, int8: Path, threads: int) -> dict:
    """COCO AP / AP50 on the config's validation set: eager, ORT fp32, ORT int8 (same loader, same post-processing)."""
    import contextlib
    import io

    from detr_kit.build import build_datasets, build_postprocessor, build_val_loader
    from detr_kit.engine.evaluator import evaluate
    from detr_kit.export.onnx_model import OnnxModel

    _, val = build_datasets(cfg, label_map)
    loader = build_val_loader(val, batch_size=8, num_workers=0)
    record = {"model": "quickstart", "ap_images": len(val)}
    runners = (("eager", model), ("ort_fp32", OnnxModel(fp32, threads)), ("ort_int8", OnnxModel(int8, threads)))
    for name, runner in runners:
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = evaluate(runner, build_postprocessor(cfg), loader, val.coco, label_map, "cpu", verbose=False)
        record[f"{name}_ap"], record[f"{name}_ap50"] = metrics["AP"], metrics["AP50"]
    return record


def table(records: list[dict]) -> str:
    rows = ["| model | input | export | PyTorch eager s | ORT fp32 s (x eager) | max abs diff fp32 (logits, boxes) "
            "| ORT int8 s (x eager) |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if "size" not in r:
            continue
        cells = [r["model"], "x".join(map(str, r["size"])), r["export"], f"{r['eager_s']:.3f}"]
        for name in ("fp32", "int8"):
            if f"ort_{name}_s" in r:
                cells.append(f"{r[f'ort_{name}_s']:.3f} ({r['eager_s'] / r[f'ort_{name}_s']:.2f}x)")
                if name == "fp32":
                    cells.append(", ".join(f"{d:.1e}" for d in r["ort_fp32_diff"]))
            else:
                cells += ["-", "-"] if name == "fp32" else ["-"]
        rows.append("| " + " | ".join(cells) + " |")
    for r in records:
        if "ort_int8_ap" in r:
            rows.append("")
            rows.append(f"quickstart validation set ({r['ap_images']} images): AP / AP50 eager {r['eager_ap']:.4f} / "
                        f"{r['eager_ap50']:.4f}, ORT fp32 {r['ort_fp32_ap']:.4f} / {r['ort_fp32_ap50']:.4f}, ORT int8 "
                        f"{r['ort_int8_ap']:.4f} / {r['ort_int8_ap50']:.4f} (int8 change: AP "
                        f"{r['ort_int8_ap'] - r['eager_ap']:+.4f}, AP50 {r['ort_int8_ap50'] - r['eager_ap50']:+.4f})")
    return "\n".join(rows)


def goal(records: list[dict], sizes) -> str:
    """Our ONNX Deformable-DETR-R50 >= 1.5x faster than our eager and than every peer time measured, per size."""
    by = {(r["model"], tuple(r["size"])): r for r in records if "size" in r}
    lines = []
    for size in sizes:
        ours = by.get(("deformable_r50", size), {})
        peer = by.get(("hf_deformable_r50", size), {})
        if "ort_fp32_s" not in ours:
            lines.append(f"{size[0]}x{size[1]}: our ONNX Deformable-DETR-R50 was not measured")
            continue
        rivals = {"our eager": ours["eager_s"], "HF eager": peer.get("eager_s"), "HF ONNX": peer.get("ort_fp32_s")}
        parts = [f"{t / ours['ort_fp32_s']:.2f}x {name}" if t else f"{name} not measured" for name, t in rivals.items()]
        met = all(t and t / ours["ort_fp32_s"] >= 1.5 for t in rivals.values())
        lines.append(f"{size[0]}x{size[1]}: ORT fp32 {ours['ort_fp32_s']:.3f} s vs {', '.join(parts)} -> goal "
                     f"{'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    from detr_kit.engine.outputs import atomic_output

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs/quickstart/best.pth")
    parser.add_argument("--models", nargs="+", default=[*OURS, *PEERS], choices=[*OURS, *PEERS])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=[f"{h}x{w}" for h, w in SIZES],
                        help="HxW (default 640x640 800x1066)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results_deploy.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # worker mode: one model, JSON lines
    args = parser.parse_args()
    sizes = [tuple(int(side) for side in size.split("x")) for size in args.sizes]
    if args.one:
        measure_model(args.models[0], args.checkpoint, args.threads, args.repeats, sizes)
        return
    start, records = time.perf_counter(), []
    for key in args.models:
        cmd = [sys.executable, "-m", "bench.deploy", "--one", "--models", key, "--checkpoint", str(args.checkpoint),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--sizes", *args.sizes]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            print(f"{key}: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        records += lines
        for line in lines:  # as they come, so that an interrupted run keeps what it measured
            print(json.dumps(line), file=sys.stderr)
        print(f"{key}: {len(lines)} records, {time.perf_counter() - start:.0f} s so far", file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps({"machine": machine, "command": sys.argv, "records": records}, indent=1))
    print(f"{machine}; total {time.perf_counter() - start:.0f} s\n\n{table(records)}\n\n{goal(records, sizes)}")


if __name__ == "__main__":
    main()
