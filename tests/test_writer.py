"""The background writer's edge cases that the engine-level tests cannot reach."""

from __future__ import annotations

import threading

from budgetkit.ledger._writer import BatchWriter, _writers


def test_a_flush_from_a_signal_handler_inside_submit_does_not_deadlock():
    """SIGTERM's handler runs on the main thread, maybe while it holds the writer's lock
    inside ``submit``; its flush-and-close must still finish (and write the rows)."""
    written: list[dict[str, int]] = []
    writer = BatchWriter(written.extend, flush_interval=0.01)
    writer.submit({"n": 1})
    outcome: list[bool] = []

    def interrupted_submit() -> None:
        with writer._lock:  # the state of a thread interrupted inside submit
            outcome.append(writer.close(timeout=5))

    thread = threading.Thread(target=interrupted_submit, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        _writers.discard(writer)  # or the exit hook would hang on the same lock
    assert not thread.is_alive(), "close() deadlocked on the writer's own lock"
    assert outcome == [True] and written == [{"n": 1}]


def test_rows_beyond_the_queue_go_to_the_backlog_and_are_all_written():
    written: list[dict[str, int]] = []
    gate = threading.Event()

    def slow_write(batch):
        gate.wait(5)
        written.extend(batch)

    writer = BatchWriter(slow_write, batch_size=2, max_queue=3, flush_interval=0.01)
    for n in range(10):
        writer.submit({"n": n})  # never blocks, whatever the writer is doing
    gate.set()
    assert writer.close(timeout=5)
    assert [row["n"] for row in written] == list(range(10)) and writer.dropped == 0
