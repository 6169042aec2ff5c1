"""The journal: a usage row is on disk before its call returns, and a killed process's rows
reach the database at the next start, exactly once (SQLite file and PostgreSQL).

The kill tests hold the database's write lock from the test process while the child
records, so every row the child records is still queued in its writer when SIGKILL lands:
without the journal they would all be lost (the control test shows it).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from budgetkit import Engine
from budgetkit.ledger import UsageRow
from budgetkit.ledger._journal import Journal, journal_folder, replay_journals

_RECORDING_SCRIPT = textwrap.dedent("""
    import sys
    from budgetkit import Engine

    db, journal_dir, use_journal = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    engine = Engine(db=db, journal=(journal_dir if journal_dir != "-" else True)
                    if use_journal else False)
    print("ready", flush=True)
    done = 0
    while True:
        engine.record("gpt-4o-mini", input_tokens=10, output_tokens=done % 7,
                      request_id=f"call-{done}", tags=("kill-test",))
        done += 1
        print(done, flush=True)
""")


@contextmanager
def _database_locked(url: str) -> Iterator[None]:
    """Hold the ledger's write lock: the child's writer cannot commit a single row."""
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url) as conn:
            conn.execute("LOCK TABLE budgetkit_usage IN EXCLUSIVE MODE")
            yield
            conn.rollback()
        return
    import sqlite3

    conn = sqlite3.connect(url, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _record_then_kill(tmp_path: Path, url: str, *, journal: bool, calls: int = 300,
                      journal_dir: str = "-") -> int:
    script = tmp_path / "record.py"
    script.write_text(_RECORDING_SCRIPT)
    Engine(db=url, journal=False).close()  # tables exist before the lock is taken
    with _database_locked(url):
        process = subprocess.Popen([sys.executable, str(script), url, journal_dir,
                                    "1" if journal else "0"],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        finished = 0
        for line in process.stdout:
            if line.strip() == "ready":
                continue
            finished = int(line)
            if finished >= calls:
                break
        process.kill()  # SIGKILL: no atexit, no flush, no signal handler
        remaining = process.stdout.read()  # (not communicate(): it skips read-ahead lines)
        process.wait(timeout=60)
        for line in remaining.split():
            finished = int(line)  # calls that returned before the kill landed
        assert process.returncode == -signal.SIGKILL
    return finished


def _request_ids(url: str) -> list[str]:
    with Engine(db=url, journal=False) as engine:
        return [row.request_id for row in engine.usage(tag="kill-test")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_with_every_row_queued_loses_none(tmp_path, request, backend, monkeypatch):
    monkeypatch.setenv("BUDGETKIT_JOURNAL_DIR", str(tmp_path / "journals"))
    url = (str(tmp_path / "kill.db") if backend == "sqlite"
           else request.getfixturevalue("pg_url"))
    finished = _record_then_kill(tmp_path, url, journal=True)
    assert finished >= 300
    assert _request_ids(url) == []  # nothing had reached the database

    with Engine(db=url) as engine:  # the next start replays the dead process's journal
        rows = engine.usage(tag="kill-test")
        ids = [row.request_id for row in rows]
        summary = {row.request_id: (row.output_tokens, row.cost_nanos) for row in rows}
    # every call that returned is there, exactly once (one more may have been journaled
    # between its write and its print)
    assert sorted(ids) == sorted(set(ids))
    assert {f"call-{i}" for i in range(finished)} <= set(ids)
    assert len(ids) <= finished + 1
    assert summary["call-12"][0] == 12 % 7 and summary["call-12"][1] > 0

    with Engine(db=url) as engine:  # a second start replays nothing again
        assert len(engine.usage(tag="kill-test")) == len(ids)
        report_total = sum(row.cost_nanos for row in engine.usage(tag="kill-test"))
    folder = journal_folder(Engine(db=url, journal=False).store.url)
    assert folder is not None
    assert not any(folder.glob("*.journal"))  # replayed files are gone
    assert report_total == sum(cost for _tokens, cost in summary.values())


def test_without_the_journal_the_same_kill_loses_the_queued_rows(tmp_path):
    """The control: the scenario above really does lose rows when nothing journals them."""
    url = str(tmp_path / "nojournal.db")
    finished = _record_then_kill(tmp_path, url, journal=False, calls=100)
    assert finished >= 100
    with Engine(db=url) as engine:
        assert engine.usage(tag="kill-test") == []


@pytest.mark.slow
def test_sigkill_mid_run_without_a_lock_loses_none(tmp_path):
    """The ordinary case: the writer is committing batches when the kill lands; what was
    committed is not inserted twice and what was not is replayed."""
    url = str(tmp_path / "running.db")
    script = tmp_path / "record.py"
    script.write_text(_RECORDING_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), url, "-", "1"],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    finished = 0
    for line in process.stdout:
        if line.strip() != "ready":
            finished = int(line)
            if finished >= 2000:
                break
    process.kill()
    remaining = process.stdout.read()
    process.wait(timeout=60)
    finished = max([finished, *(int(line) for line in remaining.split())])
    with Engine(db=url) as engine:
        ids = [row.request_id for row in engine.usage(tag="kill-test")]
        assert engine.store.rollup_status() is not None
    assert len(ids) == len(set(ids))
    assert {f"call-{i}" for i in range(finished)} <= set(ids)


def test_a_live_engines_journal_is_left_alone(tmp_path):
    url = str(tmp_path / "live.db")
    with Engine(db=url) as first:
        first.record("gpt-4o-mini", input_tokens=5, request_id="first")
        assert first._writer._journal is not None
        own = first._writer._journal.path
        with Engine(db=url) as second:  # opens the same ledger while `first` lives
            assert own is not None and own.exists()
            second.record("gpt-4o-mini", input_tokens=5, request_id="second")
        rows = {row.request_id for row in first.usage()}
    assert rows == {"first", "second"}


def test_journal_truncated_once_rows_are_committed_and_deleted_at_close(tmp_path):
    url = str(tmp_path / "trunc.db")
    engine = Engine(db=url)
    journal = engine._writer._journal
    assert journal is not None and journal.path is not None
    header = journal.path.stat().st_size
    for index in range(50):
        engine.record("gpt-4o-mini", input_tokens=5, request_id=f"r{index}")
    assert journal.path.stat().st_size > header  # on disk before the writer ran
    assert engine.flush()
    assert journal.path.stat().st_size == header  # committed: truncated
    path = journal.path
    engine.close()
    assert not path.exists()


def test_segments_rotate_and_a_closed_segment_goes_once_committed(tmp_path):
    folder = tmp_path / "j"
    journal = Journal(folder, ["id", "created_at", "tags", "model"], segment_bytes=300)
    first = journal.path
    for index in range(10):
        journal.append({"id": f"id{index}", "created_at": None, "tags": (), "model": "m"})
    assert journal.path != first and first is not None and first.exists()
    journal.committed([f"id{index}" for index in range(5)])
    assert first.exists()  # some of its rows are still outstanding
    journal.committed([f"id{index}" for index in range(10)])
    assert not first.exists()
    journal.close(delete=True)
    assert list(folder.iterdir()) == []


def test_torn_and_damaged_lines_are_skipped_and_named(tmp_path, caplog):
    folder = tmp_path / "j"
    folder.mkdir()
    columns = ["id", "created_at", "model"]
    good = json.dumps(["a1", "2026-01-01T00:00:00", "gpt-4o"]).encode()
    bad = json.dumps(["a2", "2026-01-01T00:00:00", "gpt-4o"]).encode()
    lines = [json.dumps({"budgetkit_journal": 1, "columns": columns}).encode() + b"\n",
             b"%08x %s\n" % (zlib.crc32(good), good),
             b"%08x %s\n" % (zlib.crc32(good) ^ 1, bad),  # CRC mismatch
             b"%08x %s" % (zlib.crc32(bad), bad[:10])]  # torn: no newline
    (folder / "999999-dead-1.journal").write_bytes(b"".join(lines))
    got: list[dict[str, object]] = []
    assert replay_journals(folder, got.extend) == 1
    assert [row["id"] for row in got] == ["a1"]
    assert "skipped 2 torn or damaged line(s)" in caplog.text
    assert not (folder / "999999-dead-1.journal").exists()


def test_journal_folder_by_database(tmp_path, monkeypatch):
    assert journal_folder("sqlite://") is None  # in memory: nothing outlives the process
    assert journal_folder(f"sqlite:///{tmp_path}/a.db") == Path(f"{tmp_path}/a.db"
                                                                ".budgetkit-journal")
    monkeypatch.setenv("BUDGETKIT_JOURNAL_DIR", str(tmp_path / "jd"))
    one = journal_folder("postgresql+psycopg://u:secret@h:5432/ledger")
    same = journal_folder("postgresql+psycopg://u:other@h:5432/ledger")
    other = journal_folder("postgresql+psycopg://u@h:5432/another")
    assert one == same != other  # the password is not the ledger's identity
    assert one is not None and one.parent == tmp_path / "jd" and "secret" not in str(one)
    assert journal_folder("postgresql://h/x", tmp_path / "mine") == tmp_path / "mine"


def test_replay_is_idempotent_and_keeps_the_rollup_exact(tmp_path):
    url = str(tmp_path / "idem.db")
    with Engine(db=url, journal=False) as engine:
        engine.record("gpt-4o-mini", input_tokens=100, output_tokens=10, request_id="x")
        engine.flush()
        (row,) = engine.usage()
        values = {column: getattr(row, column if column != "metadata" else "metadata_")
                  for column in UsageRow.__table__.columns.keys()}  # type: ignore[attr-defined]
        extra = dict(values, id="f" * 32, request_id="y")
        inserted = engine.store.insert_missing_usage([values, extra, extra])
        assert inserted == 1
        assert sorted(r.request_id for r in engine.usage()) == ["x", "y"]
        from sqlalchemy import func, select

        from budgetkit.ledger._tables import USAGE_HOURLY

        with engine.store.engine.connect() as conn:  # each row counted once in the rollup
            rolled = conn.execute(select(func.sum(USAGE_HOURLY.c.cost_nanos))).scalar()
        assert rolled == 2 * row.cost_nanos


def test_a_row_is_in_the_file_when_submit_returns(tmp_path):
    """The journal is appended on the caller's thread: the row is in the file (the
    kernel's) the moment submit() returns, while the database write has not happened."""
    import threading

    from budgetkit.ledger import BatchWriter

    release = threading.Event()
    written: list[str] = []

    def slow_write(rows):  # the database is stuck
        release.wait(10)
        written.extend(row["id"] for row in rows)

    journal = Journal(tmp_path / "j", ["id", "created_at", "tags", "request_id"])
    writer = BatchWriter(slow_write, journal=journal, flush_interval=0.01)
    try:
        writer.submit({"id": "a" * 32, "created_at": None, "tags": (), "request_id": "now"})
        assert journal.path is not None
        lines = journal.path.read_text().splitlines()
        assert len(lines) == 2 and '"now"' in lines[1]
    finally:
        release.set()
        assert writer.close(timeout=10)
    assert written == ["a" * 32]
    assert list((tmp_path / "j").glob("*.journal")) == []  # all committed: deleted


def test_an_unusable_journal_folder(tmp_path, monkeypatch, caplog):
    """The default folder unusable (a read-only home): the engine runs on without the
    journal and says so; a folder the user named: a typed error naming it."""
    from budgetkit.errors import ConfigurationError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the journal folder would go")
    with pytest.raises(ConfigurationError, match="not-a-folder"):
        Engine(db=str(tmp_path / "named.db"), journal=str(blocker / "journal"))
    monkeypatch.setenv("BUDGETKIT_JOURNAL_DIR", str(blocker / "journal"))
    from budgetkit.ledger import open_journal

    class PostgresLike:  # the default folder of a server URL, without a server
        url = "postgresql+psycopg://u@h:5432/ledger"

        def insert_missing_usage(self, rows):
            raise AssertionError("nothing to replay")

    assert open_journal(PostgresLike()) is None
    assert "cannot use the usage journal" in caplog.text
