"""Atomic folder writes: the destination is the complete old folder or the complete new one."""

import pytest

from collider_models.atomic import TEMP_PREFIX, atomic_dir


def test_new_folder_appears_complete(tmp_path):
    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not dest.exists()  # nothing visible until the block ends
    assert (dest / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_replaces_existing_folder(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (dest / "old.txt").read_text() == "old"
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())


def test_failure_leaves_old_folder_untouched(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(dest) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise OSError("disk full")
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_destination_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        with atomic_dir(tmp_path / "f"):
            pass


def test_folder_and_files_get_the_usual_modes(tmp_path):
    import os
    import stat

    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as tmp:
        (tmp / "sub").mkdir()
        path = tmp / "sub" / "weights.bin"
        path.write_bytes(b"x")
        os.chmod(path, 0o600)  # as a writer that creates private files leaves it
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((dest / "sub" / "weights.bin").stat().st_mode) == 0o666 & ~mask | 0o600
