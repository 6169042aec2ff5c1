"""The journal: a usage row is on disk before the call that recorded it returns.

The writer batches rows to the database every few milliseconds, off the callers' threads.
A process killed in between (SIGKILL, the OOM killer, a segfault) used to lose the rows of
that gap. Now each row is also appended to a local journal file first, with one ``write()``
on the caller's thread (~5 µs: JSON of the row's values plus a CRC); the next engine that
opens the same ledger, in any process, puts into the database whatever the journal holds
and the database lacks.

Layout and format:

- One folder per ledger: next to a SQLite file ``x.db`` it is ``x.db.budgetkit-journal/``;
  for other databases (PostgreSQL) ``journal_dir`` or ``BUDGETKIT_JOURNAL_DIR``, else
  ``~/.budgetkit/journal/<database>-<hash of its URL>/``. Every process that opens the ledger
  should see the same folder (the same machine or a shared volume) for its rows to be
  replayed by the next start; otherwise they wait for a process that sees it.
- One file per engine and segment, ``<pid>-<token>-<n>.journal``, held under an exclusive
  ``flock`` while its engine lives, so a replaying process can tell a dead writer's file
  (the lock is free) from a live one's (it is not), across processes and within one.
- A file is a header line (``{"budgetkit_journal": 1, "columns": [...]}``) then one line
  per row: ``<crc32 as 8 hex digits> <JSON list of the row's values>``. A line that is
  torn (the process died mid-write) or fails its CRC is skipped and logged.

Durability (the fsync policy, group commit): a row's ``write()`` returns before the row's
recording call does, so **process death loses nothing**: the bytes are in the kernel's page
cache and reach the file even though the process is gone. With the journal on, the writer
sends rows to the database in batches about a second apart; before writing a batch it
calls ``fdatasync`` on the journal if bytes have waited there a second or more, and at once
when the database refuses a batch (the rows will wait longer). So **a power loss or kernel
crash may lose the rows of about the last second or two** that the database had not
committed either (SQLite's own commits, WAL with ``synchronous=NORMAL``, are not fsynced
per commit either).

Rows leave the journal once the database has them: the current file is truncated whenever
every row it holds is committed, and a file over ``segment_bytes`` is closed and a new one
started; a closed file is deleted once all its rows are committed. Rows the writer had to
drop from memory during a long database outage stay in their file, which then waits for
the next start to replay them.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere a dead writer is told by its process id alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Journal", "journal_folder", "open_journal", "replay_journals", "JOURNAL_SUFFIX"]

logger = logging.getLogger("budgetkit")

JOURNAL_SUFFIX = ".journal"
_FORMAT = 1
_SEGMENT_BYTES = 8 * 1024 * 1024
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"), check_circular=False,
                            ensure_ascii=False)
_DATETIME_COLUMNS = frozenset({"created_at"})


def journal_folder(url: str, configured: str | os.PathLike[str] | None = None) -> Path | None:
    """Where the journal of the ledger at ``url`` lives (None: an in-memory database,
    which has nothing to replay into after a crash)."""
    if configured is not None:
        return Path(configured).expanduser()
    if url in ("sqlite://", "sqlite:///:memory:") or url.startswith("sqlite:///file::memory:"):
        return None
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):].split("?", 1)[0]
        return Path(path + ".budgetkit-journal")
    from_env = os.environ.get("BUDGETKIT_JOURNAL_DIR")
    base = Path(from_env).expanduser() if from_env else Path.home() / ".budgetkit" / "journal"
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    # The password and the driver are not part of the ledger's identity.
    identity = (f"{parsed.get_backend_name()}://{parsed.username or ''}@{parsed.host or ''}:"
                f"{parsed.port or ''}/{parsed.database or ''}")
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in (parsed.database or "db"))
    return base / f"{name[:40]}-{digest}"


class Journal:
    """The append-only journal of one engine's writer (see the module docstring).

    ``append`` comes from the callers' threads, ``sync`` and ``committed`` from the writer
    thread; a row's write and its note as outstanding happen under one lock, so a file is
    never truncated over a row the database lacks.
    """

    def __init__(self, folder: Path, columns: Sequence[str], *,
                 segment_bytes: int = _SEGMENT_BYTES) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._columns = tuple(columns)
        self._created_at = self._columns.index("created_at")
        self._tags = self._columns.index("tags")
        self._header = (_ENCODER.encode({"budgetkit_journal": _FORMAT,
                                         "columns": list(self._columns)}) + "\n").encode()
        self._segment_bytes = segment_bytes
        # Reentrant: SIGTERM's handler closes the journal on the main thread, possibly
        # while that thread is inside ``append`` holding this lock.
        self._lock = threading.RLock()
        self._token = secrets.token_hex(4)
        self._number = 0
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        self._unsynced = False
        self._unsynced_since = 0.0  # monotonic: when the oldest unsynced bytes were written
        self._outstanding: set[str] = set()  # ids in the current file not yet committed
        # closed files whose rows are not all committed yet: path -> their ids
        self._closed: dict[Path, set[str]] = {}
        self._where: dict[str, set[str]] = {}  # a row id -> the outstanding set it is in
        self._late_commits: collections.deque[str] = collections.deque()  # see committed
        self._open_segment()

    # -- the caller's side ---------------------------------------------------------------
    def append(self, row: Mapping[str, Any]) -> None:
        """Put ``row`` in the journal: one ``write()``; returns when the kernel has it."""
        values = list(map(row.get, self._columns))  # (a C loop: this runs per row)
        created = values[self._created_at]
        if isinstance(created, dt.datetime):
            values[self._created_at] = created.isoformat()
        tags = values[self._tags]
        if tags is not None and not isinstance(tags, list):
            values[self._tags] = list(tags)
        data = _ENCODER.encode(values).encode()
        line = b"%08x %s\n" % (zlib.crc32(data), data)
        row_id = row["id"]
        with self._lock:
            if self._size >= self._segment_bytes and self._outstanding:
                self._rotate()
            # Noted before it is written: SIGTERM's flush may run in the middle of this
            # (on this thread), and must not delete the file under a row it holds.
            self._outstanding.add(row_id)
            self._where[row_id] = self._outstanding
            os.write(self._fd, line)
            self._size += len(line)
            if not self._unsynced:
                self._unsynced, self._unsynced_since = True, time.monotonic()

    # -- the writer's side ---------------------------------------------------------------
    def sync(self, *, older_than: float = 0.0) -> None:
        """``fdatasync`` what was appended since the last sync (group commit); with
        ``older_than``, only once the oldest unsynced bytes are that many seconds old."""
        # Never wait for the lock here: SIGTERM's handler may hold it on the main thread
        # (inside ``append``) while it waits for this very writer to flush. A skipped
        # sync stays due and happens at the next call.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if not self._unsynced or self._fd < 0:
                return
            if older_than and time.monotonic() - self._unsynced_since < older_than:
                return
            self._unsynced = False
            fd = self._fd
        finally:
            self._lock.release()
        try:
            os.fdatasync(fd) if hasattr(os, "fdatasync") else os.fsync(fd)
        except OSError:  # rotated and closed meanwhile: its rows are synced by the close
            pass

    def committed(self, ids: Sequence[str]) -> None:
        """These rows are in the database (or were refused by it for their content):
        files whose rows are all in are truncated or deleted."""
        # As in ``sync``: never wait for a lock SIGTERM's handler may hold while it waits
        # for the writer. Ids that cannot be noted now are noted by the next call that
        # holds the lock (at the latest ``close``); until then their file stays, and a
        # replay would skip rows the database already has.
        if not self._lock.acquire(timeout=0.05):
            self._late_commits.extend(ids)
            return
        try:
            self._note_committed(ids)
        finally:
            self._lock.release()

    def _note_committed(self, ids: Sequence[str]) -> None:
        """Forget committed rows; truncate or delete files that hold no other. The caller
        holds the lock."""
        late = self._late_commits
        if late:
            ids = [*ids, *(late.popleft() for _ in range(len(late)))]
        where = self._where
        for row_id in ids:
            holder = where.pop(row_id, None)
            if holder is not None:
                holder.discard(row_id)
        if not self._outstanding and self._size > len(self._header) and self._fd >= 0:
            os.ftruncate(self._fd, len(self._header))
            self._size = len(self._header)
            self._unsynced = False
        done = [path for path, left in self._closed.items() if not left]
        for path in done:
            del self._closed[path]
            _unlink(path)

    def close(self, *, delete: bool) -> None:
        """Close the files; ``delete`` (every row is committed) removes them too."""
        with self._lock:
            self._note_committed(())
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if delete and not self._outstanding and self._path is not None:
                _unlink(self._path)
            for path, left in list(self._closed.items()):
                if delete and not left:
                    _unlink(path)

    def after_fork_in_child(self) -> None:
        """A forked child writes its own file; the parent's stay the parent's."""
        self._lock = threading.RLock()
        if self._fd >= 0:
            os.close(self._fd)  # the parent's descriptor keeps the parent's lock
        self._token = secrets.token_hex(4)
        self._number = 0
        self._outstanding = set()
        self._closed = {}
        self._where = {}
        self._open_segment()

    @property
    def path(self) -> Path | None:
        return self._path

    def _rotate(self) -> None:
        assert self._path is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._closed[self._path] = self._outstanding
        self._outstanding = set()
        self._open_segment()

    def _open_segment(self) -> None:
        self._number += 1
        name = f"{os.getpid()}-{self._token}-{self._number}"
        temporary = self.folder / (name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, self._header)
        path = self.folder / (name + JOURNAL_SUFFIX)
        # Locked before it has its final name: a replayer never sees it unlocked.
        os.replace(temporary, path)
        self._fd, self._path, self._size = fd, path, len(self._header)
        self._unsynced, self._unsynced_since = True, time.monotonic()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def open_journal(store: Any, configured: str | os.PathLike[str] | None | bool = None
                 ) -> Journal | None:
    """Replay what dead writers left for ``store``'s ledger, then open this engine's
    journal. ``configured``: a folder, True / None for the default one, False for none."""
    if configured is False:
        return None
    explicit = configured not in (None, True)
    folder = journal_folder(store.url, configured if explicit else None)  # type: ignore[arg-type]
    if folder is None:
        return None
    from ._store import usage_columns

    try:
        replay_journals(folder, store.insert_missing_usage)
        return Journal(folder, usage_columns())
    except OSError as exc:
        if explicit:  # the folder the user named: say so rather than run without it
            from budgetkit.errors import ConfigurationError

            raise ConfigurationError(f"journal folder {str(folder)!r} cannot be used: "
                                     f"{exc}") from None
        # The default folder (a read-only home in a container, say): the app runs on, the
        # rows are written as before, only not SIGKILL-safe. Said loudly, once.
        logger.error("budgetkit: cannot use the usage journal in %s (%s); rows queued at a "
                     "SIGKILL will be lost. Give Engine(journal=<folder>) or "
                     "BUDGETKIT_JOURNAL_DIR a writable folder", folder, exc)
        return None


# -- replay ----------------------------------------------------------------------------------
def replay_journals(folder: Path, insert_missing: Any, *, batch_size: int = 500) -> int:
    """Put the rows of every dead writer's journal in ``folder`` into the database.

    ``insert_missing(rows)`` inserts the rows whose ids the database lacks (idempotent).
    A file is deleted once its rows are in; a file whose writer still lives is left
    alone. Returns how many rows were read from dead writers' files.
    """
    if not folder.is_dir():
        return 0
    replayed = 0
    for path in sorted(folder.iterdir()):
        if path.suffix not in (JOURNAL_SUFFIX, ".tmp"):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # another process replayed it meanwhile
            continue
        try:
            if not _lock_if_dead(fd, path):
                continue
            if path.suffix == ".tmp":  # died between creating and naming it: empty
                _unlink(path)
                continue
            rows = list(_read(fd, path))
            for start in range(0, len(rows), batch_size):
                insert_missing(rows[start:start + batch_size])
            replayed += len(rows)
            _unlink(path)
        finally:
            os.close(fd)
    if replayed:
        logger.warning("budgetkit: replayed %d usage row(s) from the journal of a process "
                       "that ended without writing them (%s)", replayed, folder)
    return replayed


def _lock_if_dead(fd: int, path: Path) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer lives
        return True
    pid = int(path.name.split("-", 1)[0])  # pragma: no cover - Windows
    return pid != os.getpid() and not _alive(pid)  # pragma: no cover


def _alive(pid: int) -> bool:  # pragma: no cover - Windows
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _read(fd: int, path: Path) -> Iterator[dict[str, Any]]:
    with os.fdopen(os.dup(fd), "rb") as handle:
        header_line = handle.readline()
        try:
            header = json.loads(header_line)
            columns = list(header["columns"])
        except (ValueError, KeyError, TypeError):
            logger.error("budgetkit: journal %s has no readable header; left in place", path)
            return
        skipped = 0
        for line in handle:
            if not line.endswith(b"\n") or len(line) < 10:
                skipped += 1  # torn: the process died mid-write
                continue
            crc, data = line[:8], line[9:-1]
            try:
                if int(crc, 16) != zlib.crc32(data):
                    skipped += 1
                    continue
                values = json.loads(data)
            except ValueError:
                skipped += 1
                continue
            row = dict(zip(columns, values))
            created = row.get("created_at")
            if isinstance(created, str):
                row["created_at"] = dt.datetime.fromisoformat(created)
            yield row
        if skipped:
            logger.error("budgetkit: skipped %d torn or damaged line(s) of journal %s",
                         skipped, path)
