"""Writing record files so that a failed, interrupted or concurrent run never damages them.

:class:`AtomicRecordWriter` streams JSON lines into a temporary file beside the target (same
folder, so the final rename never crosses file systems; a unique name per run, so concurrent runs
never share one). :meth:`~AtomicRecordWriter.commit` fsyncs it and ``os.replace`` s it onto the
target in one atomic step: a reader sees either the old file or one run's complete output, never a
mix. :meth:`~AtomicRecordWriter.abort` removes the temporary file, leaving the target untouched, or
with ``keep_partial`` renames it to ``<target>.partial`` beside the target (the existing file is
still left untouched: a complete earlier output is never replaced by a partial one).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from genbackends.errors import GenBackendsError
from genbackends.records import GenerationRecord

PARTIAL_SUFFIX = ".partial"


class AtomicRecordWriter:
    """JSONL records streamed to a temporary file and renamed onto ``target`` when complete.

    Usage: ``w = AtomicRecordWriter(path)``; ``w.write(records)`` per finished batch; then
    ``w.commit()`` on success or ``w.abort()`` on failure (``with`` does this by itself).
    """

    def __init__(self, target: str | os.PathLike[str], keep_partial: bool = False):
        self.target = Path(target)
        self.keep_partial = keep_partial
        self.num_records = 0
        self.num_batches = 0
        self.closed_as: str | None = None  # "committed", "partial" or "discarded"
        folder = self.target.parent
        if self.target.is_dir():
            raise GenBackendsError(f"--output {str(self.target)!r} is a directory")
        if not folder.is_dir():
            raise GenBackendsError(f"--output {str(self.target)!r}: folder {str(folder)!r} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=folder)
        except OSError as e:
            raise GenBackendsError(f"--output {str(self.target)!r}: cannot create a file in {str(folder)!r}: {e.strerror or e}") from None
        self.tmp_path = Path(tmp)
        # mkstemp makes 0600 files; give the result the mode the target has (or would get).
        try:
            mode = self.target.stat().st_mode & 0o777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        self._fh = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, records: Iterable[GenerationRecord]) -> None:
        """Append one batch of records and flush it to the OS (visible in the temporary file)."""
        n = 0
        for r in records:
            self._fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            n += 1
        self._fh.flush()
        self.num_records += n
        self.num_batches += 1

    def commit(self) -> Path:
        """fsync the temporary file and rename it onto the target atomically."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp_path, self.target)
        _fsync_dir(self.target.parent)
        self.closed_as = "committed"
        return self.target

    def abort(self) -> Path | None:
        """Leave the target untouched: discard the temporary file, or with ``keep_partial``
        rename it to ``<target>.partial`` (returned)."""
        if self._fh.closed:
            return None
        try:
            self._fh.flush()
            if self.keep_partial:
                os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
        if self.keep_partial:
            partial = self.partial_path
            os.replace(self.tmp_path, partial)
            self.closed_as = "partial"
            return partial
        self.tmp_path.unlink(missing_ok=True)
        self.closed_as = "discarded"
        return None

    @property
    def partial_path(self) -> Path:
        """Where ``abort`` keeps partial output: ``<target>.partial``."""
        return self.target.with_name(self.target.name + PARTIAL_SUFFIX)

    def describe_abort(self) -> str:
        """One line for the user after :meth:`abort`: what was written and where it went."""
        done = f"{self.num_records} records ({self.num_batches} finished batches)"
        target = f"{str(self.target)!r} " + ("left untouched" if self.target.exists() else "not created")
        if self.closed_as == "partial":
            return f"{done} kept in {str(self.partial_path)!r}; {target}"
        if not self.num_records:
            return f"no records written; {target}"
        return f"{done} written before the run stopped, discarded (--keep-partial keeps them); {target}"

    def __enter__(self) -> "AtomicRecordWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable (POSIX); not possible (nor needed) everywhere.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
