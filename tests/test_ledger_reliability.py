"""The ledger under stress: concurrency, SIGTERM, and a database that goes away and comes back.

Every finished call must have exactly one row, and the user's calls must never fail or wait
because the ledger cannot write.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from budgetkit import Engine

langchain_core = pytest.importorskip("langchain_core")

from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult  # noqa: E402

from langchain_budgetkit import BudgetkitCallbackHandler  # noqa: E402


class TinyChatModel(BaseChatModel):
    """Answers at once and reports usage, like a provider integration."""

    model_name: str = "gpt-4o-mini"

    @property
    def _llm_type(self) -> str:
        return "tiny-fake-chat"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        message = AIMessage(content="ok", response_metadata={"model_name": self.model_name},
                            usage_metadata={"input_tokens": 11, "output_tokens": 2,
                                            "total_tokens": 13})
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                         **kwargs: Any) -> ChatResult:
        await asyncio.sleep(0)  # let the other tasks interleave
        return self._generate(messages)


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``condition`` (a synchronisation wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---------------------------------------------------------------------------- concurrency

def test_eight_threads_of_a_thousand_calls(tmp_path):
    with Engine(db=str(tmp_path / "threads.db")) as engine:
        handler = BudgetkitCallbackHandler(engine)
        model = TinyChatModel()
        errors: list[BaseException] = []

        def worker(index: int) -> None:
            try:
                for call in range(1000):
                    model.invoke(f"t{index}-c{call}", config={
                        "callbacks": [handler], "metadata": {"user_id": f"thread-{index}"}})
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        rows = engine.usage()
        assert len(rows) == 8000
        assert len({row.run_id for row in rows}) == 8000
        for index in range(8):
            assert sum(row.user_id == f"thread-{index}" for row in rows) == 1000
        assert handler.calls == 8000 and handler._runs == {}
        assert sum(row.cost_nanos for row in rows) == handler.cost_nanos


def test_two_hundred_concurrent_asyncio_calls(tmp_path):
    with Engine(db=str(tmp_path / "tasks.db")) as engine:
        handler = BudgetkitCallbackHandler(engine)
        model = TinyChatModel()

        async def main() -> None:
            await asyncio.gather(*(model.ainvoke(f"q{i}", config={
                "callbacks": [handler], "metadata": {"request_id": f"req-{i}"}})
                for i in range(200)))

        asyncio.run(main())
        rows = engine.usage()
        assert len(rows) == 200
        assert {row.request_id for row in rows} == {f"req-{i}" for i in range(200)}


# ---------------------------------------------------------------------------- SIGTERM

_SIGTERM_SCRIPT = textwrap.dedent("""
    import sys
    from budgetkit import Engine

    engine = Engine(db=sys.argv[1])
    done = 0
    while True:
        ticket = engine.admit("gpt-4o-mini", input_tokens=10, run_id=f"call-{done}")
        engine.settle(ticket, input_tokens=10, output_tokens=1)
        done += 1
        print(done, flush=True)
""")


# The LangChain handler leaves each call's bookkeeping to the engine's deferred work.
_SIGTERM_LANGCHAIN_SCRIPT = textwrap.dedent("""
    import sys
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from budgetkit import Engine
    from langchain_budgetkit import BudgetkitCallbackHandler

    class Fake(BaseChatModel):
        model_name: str = "gpt-4o-mini"

        @property
        def _llm_type(self):
            return "fake"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            usage = {"input_tokens": 10, "output_tokens": 1, "total_tokens": 11}
            return ChatResult(generations=[ChatGeneration(
                message=AIMessage(content="ok", usage_metadata=usage))])

    engine = Engine(db=sys.argv[1])
    handler = BudgetkitCallbackHandler(engine)
    model = Fake()
    done = 0
    while True:
        model.invoke("hi", config={"callbacks": [handler],
                                   "metadata": {"request_id": f"call-{done}"}})
        done += 1
        print(done, flush=True)
""")


@pytest.mark.parametrize("script_text", [_SIGTERM_SCRIPT, _SIGTERM_LANGCHAIN_SCRIPT],
                         ids=["engine", "langchain-handler"])
@pytest.mark.slow
def test_sigterm_keeps_every_finished_call(tmp_path, script_text):
    db = tmp_path / "sigterm.db"
    script = tmp_path / "calls.py"
    script.write_text(script_text)
    process = subprocess.Popen([sys.executable, str(script), str(db)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    finished = 0
    for line in process.stdout:  # let it make a few hundred calls, mid-batch
        finished = int(line)
        if finished >= 300:
            break
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    finally:
        process.kill()
    # Dead, so read() returns at once, and it includes the lines the loop above had read
    # ahead (communicate() reads the pipe itself and would miss those).
    for line in process.stdout.read().split():
        finished = int(line)  # calls that finished before the signal landed
    assert process.returncode == -signal.SIGTERM  # it still dies of SIGTERM
    with Engine(db=str(db)) as engine:
        run_ids = {row.request_id or row.run_id for row in engine.usage()}
    assert {f"call-{i}" for i in range(finished)} <= run_ids
    assert len(run_ids) >= finished >= 300


# SIGTERM is handled on the main thread between two of its bytecodes, wherever that is: now
# and then (a loaded machine, many calls) inside the writer's wake-up in ``submit``, where a
# threading.Event held its lock and the flush's own wake-up deadlocked. Made certain here: a
# trace function sends the signal once the wake-up's first statement has run (where it would
# take a lock), or as it returns if it has only one.
_SIGTERM_INSIDE_THE_WAKE_UP_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from budgetkit import Engine

    engine = Engine(db=sys.argv[1], journal=False, batch_size=1)  # every call wakes it
    for n in range(20):
        ticket = engine.admit("gpt-4o-mini", input_tokens=10, run_id=f"call-{n}")
        engine.settle(ticket, input_tokens=10, output_tokens=1)
    engine.flush()  # an empty queue: the next row is a full batch, and submit wakes the writer
    lines, fired = [], []

    def inside(frame, event, arg):
        if fired:
            return None
        if event == "line" and not lines:
            lines.append(frame.f_lineno)
            return inside
        fired.append(True)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at this thread's next bytecode
        return None

    def calls(frame, event, arg):
        caller = frame.f_back
        if not fired and not lines and frame.f_code.co_name == "set" \\
                and caller is not None and caller.f_code.co_name == "submit":
            return inside
        return None

    sys.settrace(calls)
    ticket = engine.admit("gpt-4o-mini", input_tokens=10, run_id="call-20")
    engine.settle(ticket, input_tokens=10, output_tokens=1)
    sys.settrace(None)
    print("fired" if fired else "not fired", flush=True)
    import time
    time.sleep(60)
""")


@pytest.mark.slow
def test_sigterm_inside_the_writers_wake_up_neither_hangs_nor_loses_rows(tmp_path):
    db = tmp_path / "inside.db"
    script = tmp_path / "inside.py"
    script.write_text(_SIGTERM_INSIDE_THE_WAKE_UP_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(db)],
                               stdout=subprocess.PIPE, text=True)
    try:
        process.wait(timeout=45)  # a deadlock never ends
    finally:
        process.kill()
    out = process.stdout.read() if process.stdout else ""
    assert process.returncode == -signal.SIGTERM, out  # died of it, inside settle()
    with Engine(db=str(db)) as engine:  # every finished call, and the interrupted one
        assert {row.run_id for row in engine.usage()} == {f"call-{n}" for n in range(21)}


# The same moment for the journal: SIGTERM lands while the main thread is inside
# Journal.append, holding the journal's lock, and the handler's flush waits for the writer.
# The writer must not wait for that lock (it used to, and the flush stalled until its 10 s
# timeout). The trace function fires just after append's write, inside the lock.
_SIGTERM_INSIDE_THE_JOURNAL_SCRIPT = textwrap.dedent("""
    import linecache, os, signal, sys
    from budgetkit import Engine

    engine = Engine(db=sys.argv[1], batch_size=1)
    for n in range(20):
        ticket = engine.admit("gpt-4o-mini", input_tokens=10, run_id=f"call-{n}")
        engine.settle(ticket, input_tokens=10, output_tokens=1)
    # no flush: journaled rows wait about a second for their batch, so the handler's
    # flush has rows for the writer to commit (and note in the journal) while it waits
    fired = []

    def inside(frame, event, arg):
        if not fired and event == "line" and "self._size +=" in linecache.getline(
                frame.f_code.co_filename, frame.f_lineno):
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return None if fired else inside

    def calls(frame, event, arg):
        if not fired and frame.f_code.co_name == "append" \\
                and frame.f_code.co_filename.endswith("_journal.py"):
            return inside
        return None

    sys.settrace(calls)
    ticket = engine.admit("gpt-4o-mini", input_tokens=10, run_id="call-20")
    engine.settle(ticket, input_tokens=10, output_tokens=1)
    sys.settrace(None)
    print("fired" if fired else "not fired", flush=True)
    import time
    time.sleep(60)
""")


@pytest.mark.slow
def test_sigterm_inside_a_journal_append_neither_stalls_nor_loses_rows(tmp_path):
    db = tmp_path / "journal.db"
    script = tmp_path / "journal.py"
    script.write_text(_SIGTERM_INSIDE_THE_JOURNAL_SCRIPT)
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, str(script), str(db)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        process.wait(timeout=45)
    finally:
        process.kill()
    took = time.monotonic() - started
    err = process.stderr.read() if process.stderr else ""
    assert process.returncode == -signal.SIGTERM, err
    # the handler's flush gave up after its 10 s timeout when the writer waited for the lock
    assert "could not be written before close" not in err, err
    assert took < 9, took
    with Engine(db=str(db)) as engine:  # the row being appended is replayed from the journal
        assert {row.run_id for row in engine.usage()} == {f"call-{n}" for n in range(21)}


# ---------------------------------------------------------------------------- database outage

def test_sqlite_file_gone_then_back(tmp_path, caplog):
    folder = tmp_path / "ledger"
    folder.mkdir()
    with Engine(db=str(folder / "usage.db")) as engine:
        handler = BudgetkitCallbackHandler(engine)
        model = TinyChatModel()
        model.invoke("before", config={"callbacks": [handler]})
        assert engine.flush(timeout=10)

        # The disk goes away: the file's folder disappears and open connections drop.
        hidden = tmp_path / "unmounted"
        folder.rename(hidden)
        (tmp_path / "ledger").write_text("not a folder")  # nothing can open the path now
        engine.store.engine.dispose()
        with caplog.at_level(logging.ERROR, logger="budgetkit"):
            for i in range(50):  # calls keep working while the ledger cannot write
                assert model.invoke(f"during {i}", config={"callbacks": [handler]}).content
            assert wait_until(lambda: any("cannot write usage rows" in r.getMessage()
                                          for r in caplog.records))
            assert engine.flush(timeout=0.2) is False  # rows wait in memory

            (tmp_path / "ledger").unlink()
            hidden.rename(folder)  # the disk is back
            assert engine.flush(timeout=30)
        failures = [r for r in caplog.records if "cannot write usage rows" in r.getMessage()]
        assert len(failures) == 1  # logged once, not per call or per retry
        assert len(engine.usage()) == 51


def test_rows_kept_in_memory_up_to_a_bound(tmp_path, caplog):
    folder = tmp_path / "ledger"
    folder.mkdir()
    with Engine(db=str(folder / "usage.db"), max_queue=10, max_backlog=40) as engine:
        handler = BudgetkitCallbackHandler(engine)
        model = TinyChatModel()
        hidden = tmp_path / "unmounted"
        folder.rename(hidden)
        (tmp_path / "ledger").write_text("not a folder")
        engine.store.engine.dispose()
        with caplog.at_level(logging.ERROR, logger="budgetkit"):
            for i in range(100):
                assert model.invoke(f"call {i}", config={
                    "callbacks": [handler], "metadata": {"request_id": f"call-{i}"}}).content
            assert wait_until(lambda: engine._writer.dropped >= 50)
            (tmp_path / "ledger").unlink()
            hidden.rename(folder)
            assert engine.flush(timeout=30)
        rows = engine.usage()
        assert 40 <= len(rows) <= 50  # the bound (backlog + hand-over queue), newest kept
        assert len(rows) + engine._writer.dropped == 100
        full = [r for r in caplog.records if "backlog full" in r.getMessage()]
        assert len(full) == 1  # once per outage, not per dropped call
        kept = {row.request_id for row in rows}
        assert "call-99" in kept and "call-0" not in kept  # the oldest rows go first


class _TcpProxy:
    """A TCP forwarder on a fixed local port that can be stopped (connection refused) and
    started again, standing in for a database server that goes down and comes back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone would not on Linux
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass


def test_postgresql_refused_then_back(pg_url, caplog):
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = _TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        with Engine(db=proxied) as engine:
            handler = BudgetkitCallbackHandler(engine)
            model = TinyChatModel()
            model.invoke("before", config={"callbacks": [handler]})
            assert engine.flush(timeout=10)

            proxy.stop()  # connection refused from now on
            with caplog.at_level(logging.ERROR, logger="budgetkit"):
                for i in range(50):
                    assert model.invoke(f"during {i}", config={"callbacks": [handler]}).content
                assert wait_until(lambda: any("cannot write usage rows" in r.getMessage()
                                              for r in caplog.records))
                assert engine.flush(timeout=0.2) is False
                proxy.start()
                assert engine.flush(timeout=30)
            assert len(engine.usage()) == 51
    finally:
        proxy.stop()


def test_rows_survive_a_restart_of_the_process_that_wrote_them(tmp_path):
    db = str(tmp_path / "restart.db")
    code = ("import sys; from budgetkit import Engine\n"
            "engine = Engine(db=sys.argv[1])\n"
            "for i in range(100): engine.record('gpt-4o', input_tokens=i + 1)\n")
    subprocess.run([sys.executable, "-c", code, db], check=True, timeout=60)  # normal exit
    with Engine(db=db) as engine:
        assert len(engine.usage()) == 100


# ---------------------------------------------------------------------------- a row the database refuses

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_refused_row_does_not_hold_back_its_batch(tmp_path, request, caplog, backend):
    """A row the database refuses (here a duplicate id) is dropped and logged; the rest of
    its batch is written."""
    url = str(tmp_path / "refused.db") if backend == "sqlite" else request.getfixturevalue(
        "pg_url")
    with Engine(db=url) as engine:
        first = engine.admit("gpt-4o-mini", input_tokens=10, request_id="before")
        engine.settle(first, input_tokens=10, output_tokens=1)
        engine.flush()
        for index in range(20):
            ticket = engine.admit("gpt-4o-mini", input_tokens=10, request_id=f"call-{index}")
            if index == 7:
                ticket.id = first.id  # the primary key of a row already written
            engine.settle(ticket, input_tokens=10, output_tokens=1)
        assert engine.flush(timeout=30)
        written = {row.request_id for row in engine.usage()}
    assert written == {"before"} | {f"call-{index}" for index in range(20) if index != 7}
    assert "refused usage row" in caplog.text


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_value_longer_than_its_column_is_cut_not_lost(tmp_path, request, caplog, backend,
                                                        monkeypatch):
    monkeypatch.setattr("budgetkit.ledger._store._clipped_columns", set())  # logged once a process
    url = str(tmp_path / "long.db") if backend == "sqlite" else request.getfixturevalue(
        "pg_url")
    with Engine(db=url) as engine:
        ticket = engine.admit("gpt-4o-mini", input_tokens=10, request_id="long",
                              run_id="r" * 100, user_id="u" * 300)
        engine.settle(ticket, input_tokens=10, output_tokens=1)
        (row,) = engine.usage()
    assert row.run_id == "r" * 64 and row.user_id == "u" * 200  # the columns' lengths
    assert "cut to fit the column" in caplog.text


# ---------------------------------------------------------------------------- fork

def _child_calls(engine: Engine, count: int) -> None:
    for index in range(count):
        ticket = engine.admit("gpt-4o-mini", input_tokens=10, request_id=f"child-{index}")
        engine.settle(ticket, input_tokens=10, output_tokens=1)
    engine.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_forked_child_keeps_recording_and_nothing_is_written_twice(tmp_path, request,
                                                                      backend):
    """gunicorn --preload and multiprocessing's fork hand a child the parent's engine: the
    child gets its own writer, connections and budget state; the parent's queued rows are
    written once, by the parent."""
    import multiprocessing

    from budgetkit import Budget

    url = str(tmp_path / "fork.db") if backend == "sqlite" else request.getfixturevalue(
        "pg_url")
    with Engine(db=url) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        for index in range(5):  # queued in the parent's writer at the fork
            ticket = engine.admit("gpt-4o-mini", input_tokens=10, request_id=f"parent-{index}")
            engine.settle(ticket, input_tokens=10, output_tokens=1)
        child = multiprocessing.get_context("fork").Process(target=_child_calls,
                                                            args=(engine, 20))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0
        rows = engine.usage()
        (status,) = engine.budget_status("day")
    ids = [row.request_id for row in rows]
    assert sorted(ids) == sorted([f"parent-{i}" for i in range(5)]
                                 + [f"child-{i}" for i in range(20)])
    # the child's spend reached the budget's window too, and the parent's once
    assert status.used == pytest.approx(sum(row.cost_nanos for row in rows) / 1e9)
