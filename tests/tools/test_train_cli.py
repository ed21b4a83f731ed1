"""tools/train.py and tools/eval.py as subprocesses: SIGTERM stops cleanly, --resume continues, and a run
killed with SIGKILL at random moments still completes every epoch after resuming."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detr_kit.engine.checkpoint import load_checkpoint
from detr_kit.engine.logging import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "tests" / "engine" / "tiny.yaml"


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_tiny")


def _command(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "train.py"), str(TINY_CONFIG), f"data.root={root}",
            "train.eval_every_epochs=0", "train.num_vis_images=0", "train.log_every_steps=1",
            "--output-dir", str(out), "--device", "cpu", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_steps(out: Path, count: int, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early with {process.returncode}: {process.communicate()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError("training made no progress")


def test_sigterm_writes_last_checkpoint_exits_zero_and_resume_continues(synthetic_root, tmp_path):
    out = tmp_path / "run"
    # with a DataLoader worker, and SIGTERM sent to the whole process group as schedulers do
    process = subprocess.Popen(_command(synthetic_root, out, "train.epochs=2", "data.num_workers=1"), cwd=REPO,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    _wait_for_steps(out, 1, process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output and "--resume" in output
    state = load_checkpoint(out / "last.pth")
    stopped_at = state["step"]
    assert 1 <= stopped_at < 4  # 2 epochs x 2 steps; it stopped before the end
    assert state["batch_in_epoch"] == stopped_at % 2 and state["epoch"] == stopped_at // 2

    done = subprocess.run(_command(synthetic_root, out, "train.epochs=2", "--resume"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {out / 'last.pth'}: epoch {stopped_at // 2}, step {stopped_at}" in done.stdout
    final = load_checkpoint(out / "last.pth")
    assert (final["epoch"], final["step"], final["batch_in_epoch"]) == (2, 4, 0)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert sorted(set(steps)) == [1, 2, 3, 4]  # every step ran, none twice after the resume point
    assert steps.count(stopped_at + 1) == 1


@pytest.mark.slow
def test_random_sigkills_then_resume_completes(synthetic_root, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(0)
    epochs = 4  # 8 steps: more than five kills can let through, so the run cannot finish before the last kill
    extra = (f"train.epochs={epochs}", "train.checkpoint_every_steps=1")
    kills = 0
    for attempt in range(5):
        process = subprocess.Popen(_command(synthetic_root, out, *extra, "--resume"), cwd=REPO, env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill at a random moment: during start-up, or after a random number of further steps
        if attempt % 2 == 0:
            time.sleep(rng.uniform(0.5, 4.0))
        else:
            done = len([r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"])
            try:
                _wait_for_steps(out, done + rng.randint(1, 2), process)
            except AssertionError:
                pass  # it finished or failed on its own: checked below
            time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
        if (out / "last.pth").exists():
            state = load_checkpoint(out / "last.pth")  # never torn
            assert 0 <= state["step"] <= epochs * 2
    assert kills >= 4
    final = subprocess.run(_command(synthetic_root, out, *extra, "--resume"), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    state = load_checkpoint(out / "last.pth")
    assert (state["epoch"], state["step"]) == (epochs, epochs * 2)
    assert not list(out.glob(".*.tmp"))  # temporary files of killed writes are cleaned up at start-up


def test_eval_cli_writes_metrics(synthetic_root, tmp_path):
    out = tmp_path / "run"
    subprocess.run(_command(synthetic_root, out, "train.epochs=1", "train.eval_every_epochs=1"), cwd=REPO,
                   env=_env(), check=True, capture_output=True, timeout=300)
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval.py"), str(TINY_CONFIG), f"data.root={synthetic_root}",
         "--checkpoint", str(out / "best.pth"), "--output-dir", str(tmp_path / "eval"), "--device", "cpu"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in result.stdout
    assert "category" in result.stdout  # the per-class table
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = load_checkpoint(out / "best.pth")["metrics"]
    assert metrics["AP"] == pytest.approx(trained["AP"])  # the same number the run measured
    assert (tmp_path / "eval" / "detections.json").is_file()
