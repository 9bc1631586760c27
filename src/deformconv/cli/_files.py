"""Files the commands write: checked before any work, written atomically, with the user's umask.

A command first calls :func:`check_destination` on every path it will write, so that a path it
cannot write fails in one line before minutes of work. :func:`atomic_path` then hands the writer
a temporary file in the destination's folder and renames it into place only when the writer
returns, so the destination holds either its old content or the complete new file, never a
partial one; on failure the temporary file is removed. Temporary files are created with mode
``0o666`` less the umask, as ``open()`` creates files, so the result has the permissions any
other tool would give it (``tempfile.mkstemp`` would give ``0o600``). Errors are
:class:`OutputError` with a one-line message that names the user's path, never the temporary
one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from deformconv.cli._common import first_line

__all__ = ["OutputError", "atomic_path", "check_destination"]


class OutputError(Exception):
    """A destination that cannot be written; the message is one line naming the user's path."""


def _reason(exc: BaseException, temporary: Path | None = None) -> str:
    """The first line of an error, without the temporary file's name."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = first_line(exc)
    return text.replace(str(temporary), "the file") if temporary is not None else text


def _temporary(path: Path) -> Path:
    """Create an empty, hidden temporary file beside ``path`` (mode ``0o666`` less the umask)."""
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate


def check_destination(path: str | os.PathLike[str], option: str) -> Path:
    """Check, before any work, that a file can be written at ``path``.

    Missing parent folders are created. The check creates and removes a temporary file in
    the destination folder, which is the only test that holds for every file system and user
    (``os.access`` says yes to root even on ``/proc``).

    Args:
        path: where the command will write.
        option: the command-line option that named it (``"--output"``), for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: ``path`` is a folder, or its folder cannot be created or written.

    Example:
        >>> check_destination("/proc/no-such-folder/model.pt", "--output")
        Traceback (most recent call last):
        ...
        deformconv.cli._files.OutputError: --output /proc/no-such-folder/model.pt cannot be written: its folder /proc/no-such-folder cannot be created (No such file or directory)
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{option} {target} is a folder; give a file name")
    folder = target.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{option} {target} cannot be written: {existing} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{option} {target} cannot be written: its folder {folder} cannot be created "
            f"({_reason(exc)})"
        ) from None
    try:
        _temporary(target).unlink()
    except OSError as exc:
        raise OutputError(f"{option} {target} cannot be written: {_reason(exc)}") from None
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file for the writer, renamed to ``path`` when the ``with`` block succeeds.

    Args:
        path: the destination; its folder must exist (see :func:`check_destination`).

    Yields:
        The temporary file's path, an existing empty file in the same folder.

    Raises:
        OutputError: the temporary file could not be created or written (an ``OSError``, or
            torch's ``RuntimeError`` for a failed write), or the rename failed. Any other
            exception from the block passes through; in every case the temporary file is
            removed and ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "out.txt") as temporary:
        ...     _ = temporary.write_text("done")
        >>> (folder / "out.txt").read_text(), sorted(p.name for p in folder.iterdir())
        ('done', ['out.txt'])
    """
    target = Path(path)
    try:
        temporary = _temporary(target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {_reason(exc)}") from None
    try:
        yield temporary
        os.replace(temporary, target)
    except (OSError, RuntimeError) as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.EISDIR:
            raise OutputError(f"cannot write {target}: it is a folder") from None
        raise OutputError(f"cannot write {target}: {_reason(exc, temporary)}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
