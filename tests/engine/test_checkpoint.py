"""Atomic checkpoint writes, clear errors for bad files and folders, RNG round trips."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from detr_kit.engine import checkpoint as ckpt
from detr_kit.engine.checkpoint import (
    CheckpointError,
    PickledCodeError,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
)


def test_save_load_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "step": 17, "id2label": {0: "a"}}
    save_checkpoint(tmp_path / "last.pth", state)
    loaded = load_checkpoint(tmp_path / "last.pth")
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert (loaded["epoch"], loaded["step"], loaded["id2label"]) == (3, 17, {0: "a"})
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def torch_save_that_dies_midway(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")  # partial bytes, then the disk is "full"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_that_dies_midway)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1
    torch.testing.assert_close(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth' does not exist — give the path of a .pth file"):
        load_checkpoint(tmp_path / "nope.pth")
    save_checkpoint(tmp_path / "good.pth", {"w": torch.randn(100)})
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_checkpoint(tmp_path / "truncated.pth")
    assert not isinstance(err.value, PickledCodeError)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(tmp_path / "garbage.pth")


class _RunsCode:
    """Unpickling this calls os.getcwd: harmless, but code a weights-only load must refuse to run."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_code_is_refused_as_such_not_called_corrupt(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "payload": _RunsCode()}, tmp_path / "code.pth")
    with pytest.raises(PickledCodeError) as err:
        load_checkpoint(tmp_path / "code.pth")
    assert err.value.what == f"checkpoint {str(tmp_path / 'code.pth')!r} holds pickled code (GLOBAL posix.getcwd)"
    assert err.value.fix == "refused for safety; pass --trusted if you trust its source"
    assert "corrupt" not in str(err.value)
    assert load_checkpoint(tmp_path / "code.pth", weights_only=False)["payload"] == os.getcwd()  # trusted: runs


def test_plain_pickle_is_named_as_such_not_called_corrupt(tmp_path, recwarn):
    with open(tmp_path / "plain.pth", "wb") as f:
        pickle.dump({"payload": _RunsCode()}, f, protocol=4)  # pickle.dump, not torch.save
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "plain.pth")
    assert err.value.what == f"checkpoint {str(tmp_path / 'plain.pth')!r} is a plain pickle, not a file written by " \
        "torch.save"
    assert "corrupt" not in str(err.value) and not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_folder_under_a_file_is_reported(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*a_file is a file"):
        save_checkpoint(tmp_path / "a_file" / "last.pth", {"x": 1})


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "rng.pth", {"rng": capture_rng_state()})
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])  # weights_only load works
    torch.testing.assert_close(torch.rand(4), expected[0])
    np.testing.assert_array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_temp_file_lives_in_the_destination_folder(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.dirname(src), os.path.dirname(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", spy)
    save_checkpoint(tmp_path / "sub" / "x.pth", {"a": 1})
    assert seen == [(str(tmp_path / "sub"), str(tmp_path / "sub"))]


def test_stale_temp_files_are_removed(tmp_path):
    save_checkpoint(tmp_path / "last.pth", {"a": 1})
    (tmp_path / ".last.pth.abc123.tmp").write_bytes(b"torn")  # what a SIGKILL mid-write leaves
    (tmp_path / "notes.tmp").write_text("not ours")
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [".last.pth.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "notes.tmp"]
