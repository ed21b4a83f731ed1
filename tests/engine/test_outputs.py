"""Output folders are claimed (new, empty or marked) and output files are new: a user's file is never replaced."""

from __future__ import annotations

import os
import stat

import pytest

from detr_kit.engine.outputs import (
    MARKER,
    atomic_output,
    check_output_file,
    check_output_folder,
    claim_output_folder,
)
from detr_kit.errors import OutputError


def test_new_empty_and_marked_folders_are_claimed(tmp_path):
    new = claim_output_folder(tmp_path / "a" / "b", "--out")
    assert new.is_dir() and sorted(p.name for p in new.iterdir()) == [MARKER]
    (new / "metrics.json").write_text("{}")  # an output of the claiming tool
    assert claim_output_folder(new, "--out") == new  # marked: ours again
    (tmp_path / "empty").mkdir()
    assert (claim_output_folder(tmp_path / "empty", "--out") / MARKER).is_file()


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.yaml").write_text("my: config\n")
    (user / "notes.txt").write_text("notes")
    with pytest.raises(OutputError) as err:
        claim_output_folder(user, "--output-dir")
    assert err.value.what == f"output folder {user} holds files detr_kit did not write (config.yaml, notes.txt)"
    assert err.value.fix.startswith("choose a new or empty folder with --output-dir")
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml", "notes.txt"]  # no marker written
    assert (user / "config.yaml").read_text() == "my: config\n"
    (user / MARKER).write_text("")  # the user hands the folder to detr_kit
    assert claim_output_folder(user, "--output-dir") == user


def test_files_and_paths_under_files_are_refused(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="a_file is a file — choose a folder with --out"):
        claim_output_folder(tmp_path / "a_file", "--out")
    with pytest.raises(OutputError, match=r"a_file/run is not writable \(.*a_file is a file\)"):
        claim_output_folder(tmp_path / "a_file" / "run", "--out")
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder_is_reported(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OutputError, match="locked is not writable"):
            claim_output_folder(folder, "--out")
    finally:
        folder.chmod(stat.S_IRWXU)


def test_output_files_are_new_unless_overwrite_and_never_an_input(tmp_path):
    out = check_output_file(tmp_path / "new" / "model.onnx", "--out")
    assert out == tmp_path / "new" / "model.onnx" and not (tmp_path / "new").exists()  # nothing made
    existing = tmp_path / "weights.pth"
    existing.write_bytes(b"user weights")
    with pytest.raises(OutputError, match="weights.pth already exists — choose another file with --out, or pass "
                                          "--overwrite to replace it"):
        check_output_file(existing, "--out")
    assert check_output_file(existing, "--out", overwrite=True) == existing
    with pytest.raises(OutputError, match="is the input the tool reads"):
        check_output_file(existing, "--out", overwrite=True, inputs=[tmp_path / "other.pth", existing])
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="is a folder — name the file to write with --out"):
        check_output_file(tmp_path / "folder", "--out")
    with pytest.raises(OutputError, match=r"cannot be written \(.*weights.pth is a file\)"):
        check_output_file(existing / "x.onnx", "--out")
    assert existing.read_bytes() == b"user weights"


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "detections.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["detections.json"]
    with atomic_output(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["detections.json"]
    with atomic_output(tmp_path / "new" / "x.json") as tmp:  # the folder of a new file is made
        tmp.write_text("{}")
    assert (tmp_path / "new" / "x.json").read_text() == "{}"
    plain = tmp_path / "plain"
    plain.write_text("")
    assert stat.S_IMODE((tmp_path / "new" / "x.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_claim_in_flight_does_not_make_the_folder_foreign(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with atomic_output(folder / MARKER) as tmp:  # another rank of the same run is writing the marker
        tmp.write_text("{}")
        assert claim_output_folder(folder, "--output-dir") == folder
    (folder / f"{MARKER}.bak").write_text("")  # but a name that merely starts like the marker is a user's file
    (folder / MARKER).unlink()
    with pytest.raises(OutputError, match=rf"holds files detr_kit did not write \({MARKER}.bak\)"):
        claim_output_folder(folder, "--output-dir")


def test_checking_a_folder_creates_nothing_and_refuses_what_a_claim_would(tmp_path):
    assert check_output_folder(tmp_path / "new" / "run", "--output-dir") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    (tmp_path / "a_file").write_text("x")
    for folder, message in ((tmp_path / "mine", "holds files detr_kit did not write"),
                            (tmp_path / "a_file", "is a file — "), (tmp_path / "a_file" / "run", r"\(.*a_file is a file\)")):
        with pytest.raises(OutputError, match=message):
            check_output_folder(folder, "--output-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mine"]
