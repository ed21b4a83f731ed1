"""Two gloo processes on the CPU: training stays in sync, evaluation sees every image once, and a rank
whose images have no boxes does not hang the group."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from detr_kit.config import load_config
from detr_kit.engine import distributed as dist_utils

TINY_CONFIG = Path(__file__).with_name("tiny.yaml")
WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tiny model with every DINO option: denoising groups follow each rank's own largest target count.
DINO_OVERRIDES = [
    "model.deformable.num_feature_levels=2", "model.deformable.box_refine=true", "model.deformable.two_stage=true",
    "model.deformable.num_proposals=8", "model.deformable.mixed_query_selection=true", "model.deformable.dn_number=6",
    "model.deformable.look_forward_twice=true", "model.deformable.share_heads=true", "model.deformable.decoder_norm=true",
]


def _worker(rank: int, port: int, root: str, out: str, overrides: tuple[str, ...] = ()) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from detr_kit.engine.step import train_step
    from detr_kit.engine.trainer import Trainer
    from detr_kit.structures import Target

    info = dist_utils.init_distributed("cpu", timeout_s=60)  # a hang becomes an error after 60 s
    try:
        cfg = load_config(TINY_CONFIG, [f"data.root={root}", "train.epochs=1", "train.num_vis_images=0",
                                        "train.log_every_steps=1", "data.batch_size=2", *overrides])
        trainer = Trainer.create(cfg, out, dist_info=info)
        result = trainer.train()
        # A rank whose images all have no boxes must still take part in the gradient all-reduce.
        batch, targets = next(iter(trainer.train_loader))
        if rank == 1:
            targets = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), t.image_id) for t in targets]
        elif not any(len(t) for t in targets):  # rank 0 has boxes (DINO: denoising queries), rank 1 none
            first = targets[0]
            targets[0] = Target(torch.tensor([[0.5, 0.5, 0.2, 0.3]]), torch.tensor([1]), first.image_id)
        extra = [train_step(trainer.train_model, trainer.criterion, trainer.optimizer, [(batch, targets)],
                            info.device, touch_all_outputs=True).ok for _ in range(2)]
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.save({"result": result, "params": params, "extra_ok": extra,
                    "steps": len(trainer.train_loader)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist_utils.cleanup_distributed()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_processes(tmp_path):
    root, out = tmp_path / "data", tmp_path / "run"
    # generate the dataset once, before the ranks start
    from detr_kit import build

    build.build_datasets(load_config(TINY_CONFIG, [f"data.root={root}"]))
    mp.start_processes(_worker, args=(_free_port(), str(root), str(out)), nprocs=WORLD_SIZE, join=True,
                       start_method="spawn")
    states = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    # 8 images / 2 ranks / batch 2 = 2 steps on each rank
    assert [s["steps"] for s in states] == [2, 2]
    assert all(s["result"]["step"] == 2 and not s["result"]["stopped"] for s in states)
    assert all(s["extra_ok"] == [True, True] for s in states)
    for name, value in states[0]["params"].items():
        torch.testing.assert_close(states[1]["params"][name], value, rtol=0, atol=0, msg=name)
    # the evaluation gathered each of the 4 validation images exactly once (8 queries -> 8 detections each)
    detections = json.loads((out / "eval" / "detections.json").read_text())
    per_image: dict[int, int] = {}
    for d in detections:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    gt = json.loads(next(root.glob("**/instances_val.json")).read_text())
    assert sorted(per_image) == sorted(img["id"] for img in gt["images"])
    assert set(per_image.values()) == {8}
    assert states[0]["result"]["metrics"] == states[1]["result"]["metrics"]  # broadcast to every rank
    assert (out / "last.pth").is_file() and not (out / "rank1").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_processes_dino_with_a_rank_without_targets(tmp_path):
    """DINO's denoising queries exist on the rank with boxes only; the step completes on both and they agree."""
    root, out = tmp_path / "data", tmp_path / "run"
    from detr_kit import build

    build.build_datasets(load_config(TINY_CONFIG, [f"data.root={root}"]))
    mp.start_processes(_worker, args=(_free_port(), str(root), str(out), tuple(DINO_OVERRIDES)), nprocs=WORLD_SIZE,
                       join=True, start_method="spawn")
    states = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert all(s["result"]["step"] == 2 and not s["result"]["stopped"] for s in states)
    assert all(s["extra_ok"] == [True, True] for s in states)
    assert any(name.startswith("denoising.label_enc") for name in states[0]["params"])
    for name, value in states[0]["params"].items():
        torch.testing.assert_close(states[1]["params"][name], value, rtol=0, atol=0, msg=name)


def test_single_process_helpers():
    assert dist_utils.get_rank() == 0 and dist_utils.get_world_size() == 1 and dist_utils.is_main_process()
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist_utils.all_reduce_min_bool(False) is False
    assert dist_utils.all_reduce_mean({"x": 2.0}) == {"x": 2.0}
    dist_utils.barrier()
    model = torch.nn.Linear(2, 2)
    assert dist_utils.wrap_ddp(model, torch.device("cpu")) is model
    info = dist_utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.enabled) == (0, 1, False)
