"""What every command writes (deformconv.cli._files): checked first, atomic, with the umask.

The expected behaviour is POSIX's: ``os.replace`` is atomic within one file system, and files are
created with mode ``0o666 & ~umask`` (open(2)).
"""

from __future__ import annotations

import errno
import os

import pytest

from deformconv.cli._files import OutputError, atomic_path, check_destination


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_users_umask(tmp_path, umask, mask: int, mode: int) -> None:
    umask(mask)
    target = tmp_path / "figure.png"
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    assert target.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        KeyboardInterrupt(),
    ],
    ids=["disk-full", "torch-writer", "interrupt"],
)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replace"])
def test_a_failure_mid_write_leaves_no_partial_file(
    tmp_path, failure: BaseException, existing: bool
) -> None:
    target = tmp_path / "model.pt"
    if existing:
        target.write_bytes(b"old")
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else OutputError
    with pytest.raises(expected) as caught, atomic_path(target) as temporary:
        temporary.write_bytes(b"half of the")
        raise failure
    assert [p.name for p in tmp_path.iterdir()] == (["model.pt"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old"
    if expected is OutputError:
        message = str(caught.value)
        assert message.startswith(f"cannot write {target}: ")
        assert ".tmp" not in message and "\n" not in message


def test_other_errors_pass_through_and_clean_up(tmp_path) -> None:
    with pytest.raises(ValueError, match="a bug"), atomic_path(tmp_path / "x.json"):
        raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_file_is_hidden_beside_the_target(tmp_path) -> None:
    target = tmp_path / "out.png"
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".out.png.")
        assert temporary.exists() and not target.exists()


def test_check_destination_creates_missing_folders(tmp_path) -> None:
    target = tmp_path / "a" / "b" / "model.pt"
    assert check_destination(str(target), "--output") == target
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("/proc/x/m.pt", "--output /proc/x/m.pt cannot be written: its folder /proc/x cannot be "),
        ("{tmp}", "--output {tmp} is a folder; give a file name"),
        (
            "{tmp}/file.txt/m.pt",
            "--output {tmp}/file.txt/m.pt cannot be written: {tmp}/file.txt is",
        ),
    ],
    ids=["proc", "folder", "under-a-file"],
)
def test_check_destination_refuses_in_one_line(tmp_path, where: str, message: str) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError) as caught:
        check_destination(where.format(tmp=tmp_path), "--output")
    assert str(caught.value).startswith(message.format(tmp=tmp_path))
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_destination_refuses_a_read_only_folder(tmp_path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="cannot be written: Permission denied"):
        check_destination(folder / "m.pt", "--out")
