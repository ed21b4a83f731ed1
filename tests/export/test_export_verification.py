"""Verification catches every way an export can be wrong: a file that crashes at some sizes or cannot be loaded
fails those rows with the reason, wrong numbers fail, and a graph that holds the example's size is exported again
for that size with the reason in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

from detr_kit.export import export_onnx, export_torchscript, export_verified, verification_sizes, verify
from detr_kit.export.verify import onnx_runner, torchscript_runner
from detr_kit.structures import DetectionOutput

SIZE = (96, 128)


class ToyDetector(nn.Module):
    """A detector-shaped toy: 5 queries, 3 classes, from the channel means of the image."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3 * 5)

    def forward(self, images: Tensor) -> DetectionOutput:
        pooled = images.mean((2, 3))  # [B, 3]
        logits = self.head(pooled).view(-1, 5, 3)  # [B, 5, 3]
        return DetectionOutput(logits, logits[..., :1].sigmoid().expand(-1, -1, 4), (), None)


class FrozenWidthDetector(ToyDetector):
    """The toy plus a ramp over the columns whose length is a Python number taken from the input's width: a trace
    holds the example's width (other widths crash), and torch.export refuses to keep the width dynamic."""

    def forward(self, images: Tensor) -> DetectionOutput:
        width = int(images.shape[-1])
        ramp = torch.arange(width, dtype=images.dtype) / width  # [W]
        return super().forward(images * ramp)


def test_verification_sizes_are_three_and_not_multiples_of_32():
    sizes = verification_sizes((800, 1066))
    assert sizes[0] == (800, 1066) and len(set(sizes)) == 3
    assert all(h % 32 and w % 32 for h, w in sizes[1:])
    assert len({round(h / w, 2) for h, w in sizes}) == 3  # three aspect ratios
    with pytest.raises(ValueError, match="both sides >= 96"):
        verification_sizes((64, 128))


def test_a_file_that_crashes_at_some_sizes_fails_there_with_the_reason(tmp_path: Path):
    torch.manual_seed(0)
    model = ToyDetector().eval()
    path = export_onnx(model, tmp_path / "toy.onnx", SIZE).path
    # Break the file: the image goes through a Reshape to the example's shape first, so every other input
    # (another size, another batch size) makes onnxruntime fail.
    proto = onnx.load(str(path))
    fixed = onnx.helper.make_tensor("fixed_shape", onnx.TensorProto.INT64, [4], [1, 3, *SIZE])
    proto.graph.initializer.append(fixed)
    for node in proto.graph.node:
        node.input[:] = ["images_fixed" if name == "images" else name for name in node.input]
    proto.graph.node.insert(0, onnx.helper.make_node("Reshape", ["images", "fixed_shape"], ["images_fixed"]))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))

    rows = verify(model, onnx_runner(broken), verification_sizes(SIZE))
    assert [(row.size, row.batch) for row in rows if row.ok] == [(SIZE, 1)]
    for row in rows[1:]:
        assert not row.ok and row.logits is None and "Reshape" in row.error, row
        assert "the exported file failed" in row.describe() and row.describe().endswith("FAIL")


def test_a_file_that_cannot_be_loaded_fails_every_row(tmp_path: Path):
    model = ToyDetector().eval()
    path = export_onnx(model, tmp_path / "toy.onnx", SIZE).path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short, as by a full disk
    rows = verify(model, onnx_runner(path), verification_sizes(SIZE)[:1])
    assert len(rows) == 2 and all(not row.ok and row.error for row in rows)


def test_wrong_numbers_fail_with_their_size(tmp_path: Path):
    torch.manual_seed(0)
    model = ToyDetector().eval()
    path = export_torchscript(model, tmp_path / "toy.pt", SIZE)
    with torch.no_grad():
        model.head.bias.add_(0.01)  # PyTorch now differs from the file by 0.01 in every logit
    rows = verify(model, torchscript_runner(path), verification_sizes(SIZE))
    assert len(rows) == 6 and all(not row.ok and row.logits == pytest.approx(0.01, abs=1e-5) for row in rows)
    assert all(row.error is None for row in rows)


def test_a_trace_that_holds_the_example_width_is_exported_fixed_with_the_reason(tmp_path: Path):
    model = FrozenWidthDetector().eval()
    report = export_verified(model, tmp_path / "frozen.pt", "torchscript", SIZE)
    assert not report.dynamic_size and report.ok
    assert [(row.size, row.batch) for row in report.rows] == [(SIZE, 1), (SIZE, 2)]
    # The dynamic attempt crashed at the second size: that crash is the reason given, in one line.
    assert report.fixed_reason.startswith("the graph is right at 96x128 only (at 1x3x121x97: RuntimeError")
    assert "\n" not in report.fixed_reason


def test_torch_export_refusing_dynamic_sizes_gives_a_fixed_onnx_with_the_reason(tmp_path: Path):
    import onnxruntime

    model = FrozenWidthDetector().eval()
    path = tmp_path / "frozen.onnx"
    report = export_verified(model, path, "onnx", SIZE)
    assert not report.dynamic_size and report.ok and len(report.rows) == 2
    assert report.fixed_reason.startswith("the dynamic export failed: ") and "\n" not in report.fixed_reason
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, *SIZE]  # fixed H and W, dynamic batch
    logits, _ = session.run(None, {"images": np.zeros((3, 3, *SIZE), dtype=np.float32)})
    assert logits.shape == (3, 5, 3)
