"""The demo's output folder, written as a whole, and its response to SIGTERM.

``--out DIR`` ends up holding the files of exactly one run. The folder is checked before any
training (it must be new, empty, or a folder a previous ``deformconv demo`` wrote, whose
``results.json`` lists its files); the run's files are written to a hidden sibling folder, and on
success that folder replaces ``DIR`` in two renames (the old folder, if any, moves aside and is
removed), so ``DIR`` never mixes the files of two runs, and a folder holding anything else is
never touched. Folders are created with ``os.mkdir``, so they and the files in them get the
user's umask (``tempfile.mkdtemp`` would give 0700). A failed or interrupted run removes the
hidden folder and any parent folders it created; messages name the user's path, never the hidden
one.

SIGTERM (what ``kill``, ``timeout`` and ``torchrun`` send) is turned into :class:`Terminated`
while the demo runs, so the same clean-up runs as for Ctrl-C; while the folders are being
swapped both signals wait until the swap is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from deformconv.cli._files import OutputError, _reason

__all__ = ["MANIFEST", "OutputFolder", "Terminated", "sigterm_raises"]

# The file of every run that lists the run's files; a folder whose manifest lists all it holds
# was written by the demo and may be replaced.
MANIFEST = "results.json"


class Terminated(BaseException):
    """SIGTERM arrived (a ``BaseException``, like ``KeyboardInterrupt``, so that nothing that
    catches ``Exception`` swallows it)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; elsewhere the
    block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then take effect as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in watched}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def _written_by_demo(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        return False
    return {p.name for p in folder.iterdir()} <= {*map(str, files), MANIFEST}


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}")


class OutputFolder:
    """The folder ``--out`` names, replaced as a whole by each successful run.

    Construction only checks; :meth:`stage` creates the hidden folder to write into (call it
    when the results are ready, so an interrupted training leaves nothing), :meth:`commit` puts
    it in place, :meth:`discard` removes it.

    Args:
        path: the user's ``--out``.

    Raises:
        OutputError: ``path`` is a file, a folder holding files a demo run did not write, or
            cannot be created or written.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = OutputFolder(Path(tmp) / "runs" / "a")
        ...     _ = (out.stage() / "results.json").write_text('{"files": ["results.json"]}')
        ...     out.commit()
        ...     sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*"))
        ['runs', 'runs/a', 'runs/a/results.json']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.staging: Path | None = None
        self.committed = False
        self._created: list[Path] = []
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--out {self.path} exists and is not a folder")
        if self.path.is_dir() and any(self.path.iterdir()) and not _written_by_demo(self.path):
            raise OutputError(
                f"--out {self.path} holds files that deformconv demo did not write (it replaces "
                f"a folder only when its {MANIFEST} lists everything in it): choose a new or "
                "empty folder"
            )
        ancestor = self.path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"cannot write the output folder {self.path}: {ancestor} is a file")
        probe = _sibling(ancestor / self.path.name, "probe")
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as exc:
            raise OutputError(
                f"cannot write the output folder {self.path}: cannot create a folder in "
                f"{ancestor} ({_reason(exc)})"
            ) from None

    def stage(self) -> Path:
        """Create (and return) the hidden folder beside ``path`` that the run writes into."""
        missing = []
        parent = self.path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            for folder in reversed(missing):
                os.mkdir(folder)
                self._created.append(folder)
            while self.staging is None:
                candidate = _sibling(self.path, "partial")
                with contextlib.suppress(FileExistsError):
                    os.mkdir(candidate)
                    self.staging = candidate
        except OSError as exc:
            self.discard()
            raise OutputError(
                f"cannot write the output folder {self.path}: {_reason(exc)}"
            ) from None
        return self.staging

    def commit(self) -> None:
        """Replace ``path`` (and whatever an earlier run left there) with the staged folder."""
        if self.staging is None:
            raise RuntimeError("commit() before stage()")
        old = _sibling(self.path, "old")
        try:
            with _signals_deferred():
                if self.path.exists():
                    os.rename(self.path, old)
                os.rename(self.staging, self.path)
                self.committed = True
        except OSError as exc:
            if old.exists() and not self.path.exists():
                os.rename(old, self.path)
            raise OutputError(
                f"cannot write the output folder {self.path}: {_reason(exc)}"
            ) from None
        finally:
            shutil.rmtree(old, ignore_errors=True)
        self.staging = None

    def discard(self) -> None:
        """Remove the staged folder, and the parent folders :meth:`stage` created if empty."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if not self.committed:
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        self._created = []
