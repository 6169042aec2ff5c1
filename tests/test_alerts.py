"""Budget alerts: once per threshold per window (across processes), sinks, webhook."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from budgetkit import Alert, ApprovalRequired, Budget, ConfigurationError, Engine, WebhookSink
from budgetkit.budgets import LoggingSink

MODEL = "unit-model"  # $1 / $2 per million tokens


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2025, 6, 30, 20, 0)

    def __call__(self) -> dt.datetime:
        return self.now


def make_engine(db: Path, clock: Clock) -> Engine:
    engine = Engine(db=str(db), clock=clock)
    engine.catalog.register({"name": MODEL, "provider": "test", "mode": "chat",
                             "input_per_mtok": "1", "output_per_mtok": "2",
                             "context_window": 100_000, "max_output_tokens": 4_000})
    return engine


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(tmp_path: Path, clock: Clock) -> Iterator[Engine]:
    eng = make_engine(tmp_path / "alerts.db", clock)
    yield eng
    eng.close()


def spend(engine: Engine, dollars_thousandths: int) -> None:
    """Spend $0.001 × n in one call (n thousand input tokens); threshold alerts fire when
    the settler thread has settled it, so wait for that."""
    ticket = engine.admit(MODEL, input_tokens=1000 * dollars_thousandths, max_output_tokens=0)
    engine.settle(ticket)
    engine.flush()


def thresholds(alerts: list[Alert]) -> list[float | None]:
    return [alert.threshold for alert in alerts if alert.kind == "threshold"]


def test_each_threshold_fires_once_per_window_and_again_next_window(
        engine: Engine, clock: Clock) -> None:
    received: list[Alert] = []
    engine.add_budget(Budget(name="d", limit=0.1, downgrade_below=None,
                             timezone="Europe/Berlin"))
    engine.configure_budgets(alert_sinks=[received.append])
    for _ in range(4):
        spend(engine, 10)  # 10 %, 20 %, 30 %, 40 %: nothing yet
    assert thresholds(received) == []
    spend(engine, 15)  # 55 %
    spend(engine, 1)  # still above 50 %: no repeat
    assert thresholds(received) == [0.5]
    spend(engine, 40)  # 96 %: both 80 and 95 fire, in order
    assert thresholds(received) == [0.5, 0.8, 0.95]
    spend(engine, 4)  # exactly 100 %
    assert thresholds(received) == [0.5, 0.8, 0.95, 1.0]
    alert = [a for a in received if a.threshold == 1.0][0]
    assert (alert.budget, alert.spent, alert.limit, alert.percentage) == ("d", 0.1, 0.1, 100.0)
    assert "100%" in alert.message
    clock.now = dt.datetime(2025, 6, 30, 22, 0)  # midnight in Berlin: a new window
    spend(engine, 60)
    assert thresholds(received) == [0.5, 0.8, 0.95, 1.0, 0.5]
    stored = engine.alerts("d")
    assert thresholds(stored) == [0.5, 0.8, 0.95, 1.0, 0.5]
    assert {a.window_start for a in stored} == {dt.datetime(2025, 6, 29, 22),
                                                 dt.datetime(2025, 6, 30, 22)}


def test_levels_and_blocked_calls_alert(engine: Engine) -> None:
    received: list[Alert] = []
    engine.add_budget(Budget(name="d", limit=0.02, alert_at=()))
    engine.configure_budgets(alert_sinks=[received.append])
    spend(engine, 16)  # moderate at 80 % (used or reserved, judged at admission)
    spend(engine, 1)
    spend(engine, 2)  # high at 95 %
    spend(engine, 1)  # critical at 100 %
    for _ in range(2):  # blocked twice, alerted once
        with pytest.raises(ApprovalRequired):
            spend(engine, 1)
    assert [(a.kind, a.level) for a in received] == [
        ("level", "moderate"), ("level", "high"), ("level", "critical"),
        ("blocked", "critical")]


def test_two_engines_on_one_database_fire_once(tmp_path: Path, clock: Clock) -> None:
    """The stored row decides, so two processes never both send the same alert."""
    first, second = (make_engine(tmp_path / "shared.db", clock) for _ in range(2))
    got_first: list[Alert] = []
    got_second: list[Alert] = []
    for engine, sink in ((first, got_first), (second, got_second)):
        engine.add_budget(Budget(name="d", limit=0.1, alert_at=(0.5,)))
        engine.configure_budgets(alert_sinks=[sink.append])
    spend(first, 30)
    spend(second, 30)  # second crosses 50 %
    spend(first, 10)  # first sees 70 % but 50 % already fired elsewhere
    assert (thresholds(got_first), thresholds(got_second)) == ([], [0.5])
    assert thresholds(first.alerts()) == [0.5]
    first.close()
    second.close()


def test_a_failing_sink_does_not_break_the_call(engine: Engine,
                                                caplog: pytest.LogCaptureFixture) -> None:
    def broken(alert: Alert) -> None:
        raise RuntimeError("pager down")

    received: list[Alert] = []
    engine.add_budget(Budget(name="d", limit=0.01, alert_at=(0.5,)))
    engine.configure_budgets(alert_sinks=[broken, received.append])
    spend(engine, 6)
    assert thresholds(received) == [0.5]
    assert "pager down" in caplog.text


def test_logging_sink_levels(caplog: pytest.LogCaptureFixture, engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=0.01, alert_at=(0.5,)))
    engine.configure_budgets(alert_sinks=[LoggingSink()])
    with caplog.at_level(logging.WARNING, logger="budgetkit.alerts"):
        spend(engine, 6)
        spend(engine, 3)  # 90 %: moderate level reached at admission
    records = [(r.levelname, r.getMessage()) for r in caplog.records
               if r.name == "budgetkit.alerts"]
    assert records[0][0] == "WARNING" and "reached 50%" in records[0][1]
    assert any(level == "WARNING" and "level moderate" in text for level, text in records)


class _Collector(http.server.BaseHTTPRequestHandler):
    bodies: list[dict] = []
    #: statuses to answer, in order, before 204s (e.g. [503, 503]); "hang" sleeps instead
    script: list[Any] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers["Content-Length"])
        type(self).bodies.append({"json": json.loads(self.rfile.read(length)),
                                  "type": self.headers["Content-Type"],
                                  "token": self.headers.get("X-Token"),
                                  "host": self.headers.get("Host"), "path": self.path})
        answer = type(self).script.pop(0) if type(self).script else 204
        if answer == "hang":
            time.sleep(1.5)
            answer = 204
        self.send_response(answer)
        if answer in (301, 302, 307):
            self.send_header("Location", "/redirected-here")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook_url() -> Iterator[str]:
    _Collector.bodies = []
    _Collector.script = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


def test_webhook_posts_json(engine: Engine, webhook_url: str) -> None:
    sink = WebhookSink(webhook_url, headers={"X-Token": "secret"}, allow_private=True)
    engine.add_budget(Budget(name="d", limit=0.01, alert_at=(0.5, 0.8)))
    engine.add_alert_sink(sink)
    spend(engine, 9)
    assert sink.flush(10)
    posted = [body for body in _Collector.bodies if body["json"]["kind"] == "threshold"]
    assert [body["json"]["threshold"] for body in posted] == [0.5, 0.8]
    first = posted[0]
    assert first["type"] == "application/json" and first["token"] == "secret"
    assert first["json"]["budget"] == "d" and first["json"]["spent"] == 0.009
    assert first["json"]["window_start"] == "2025-06-30T00:00:00"
    assert sink.sent == len(_Collector.bodies) and sink.failed == 0


def test_webhook_failure_is_logged_not_raised(engine: Engine,
                                              caplog: pytest.LogCaptureFixture) -> None:
    sleeps: list[float] = []
    sink = WebhookSink("http://127.0.0.1:9/nothing-listens-here", timeout=2, retries=2,
                       allow_private=True, sleep=sleeps.append)
    engine.add_budget(Budget(name="d", limit=0.01, alert_at=(0.5,)))
    engine.configure_budgets(alert_sinks=[sink])
    spend(engine, 6)
    assert sink.flush(10)
    assert sink.failed == 1 and "webhook" in caplog.text
    assert sleeps == [0.5, 1.0]  # two retries, backing off


def test_webhook_url_must_be_http() -> None:
    with pytest.raises(ConfigurationError, match="ftp://x"):
        WebhookSink("ftp://x")


def an_alert() -> Alert:
    when = dt.datetime(2025, 6, 30, 12, 0)
    return Alert(budget="d", kind="threshold", level="normal", threshold=0.5, period="day",
                 unit="usd", scope_key="", window_start=when, spent=0.5, reserved=0.0,
                 limit=1.0, percentage=50.0, message="budget d reached 50%", created_at=when)


def test_webhook_retries_5xx_and_429_with_backoff_then_delivers(webhook_url: str) -> None:
    _Collector.script = [503, 429, 502]
    sleeps: list[float] = []
    sink = WebhookSink(webhook_url, allow_private=True, retries=3, backoff=0.25,
                       sleep=sleeps.append)
    sink(an_alert())
    assert sink.flush(10)
    assert (sink.sent, sink.failed) == (1, 0)
    assert len(_Collector.bodies) == 4 and sleeps == [0.25, 0.5, 1.0]
    assert sink.close(10)
    port = webhook_url.split(":")[2].split("/")[0]
    assert _Collector.bodies[-1]["host"] == f"127.0.0.1:{port}"


def test_webhook_gives_up_after_its_retries_and_does_not_retry_a_4xx(webhook_url: str) -> None:
    _Collector.script = [500, 500, 500]
    sink = WebhookSink(webhook_url, allow_private=True, retries=2, sleep=lambda _: None)
    sink(an_alert())
    assert sink.flush(10) and (sink.sent, sink.failed) == (0, 1)
    assert len(_Collector.bodies) == 3
    _Collector.script = [404]
    sink(an_alert())
    assert sink.flush(10) and sink.failed == 2 and len(_Collector.bodies) == 4


def test_webhook_times_out_and_retries(webhook_url: str) -> None:
    _Collector.script = ["hang"]
    sink = WebhookSink(webhook_url, allow_private=True, timeout=0.3, retries=1,
                       sleep=lambda _: None)
    sink(an_alert())
    assert sink.flush(10) and (sink.sent, sink.failed) == (1, 0)
    assert len(_Collector.bodies) == 2  # the hung try, then the retry


def test_webhook_does_not_follow_redirects(webhook_url: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    _Collector.script = [302]
    sink = WebhookSink(webhook_url, allow_private=True, sleep=lambda _: None)
    sink(an_alert())
    assert sink.flush(10) and (sink.sent, sink.failed) == (0, 1)
    assert [body["path"] for body in _Collector.bodies] == ["/alerts"]  # not /redirected-here
    assert "302" in caplog.text and "redirect" in caplog.text


@pytest.mark.parametrize("url, kind", [
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://10.1.2.3/hook", "private"),
    ("http://192.168.0.10/hook", "private"),
    ("http://172.16.5.4/hook", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[::1]:9000/hook", "loopback"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://0.0.0.0/hook", "unspecified"),
])
def test_webhook_refuses_private_loopback_and_link_local_addresses(url: str, kind: str) -> None:
    with pytest.raises(ConfigurationError, match=kind) as info:
        WebhookSink(url)
    assert "allow_private=True" in str(info.value)
    WebhookSink(url, allow_private=True)  # the user may allow them


def test_webhook_refuses_a_host_name_that_resolves_to_loopback(
        webhook_url: str, caplog: pytest.LogCaptureFixture) -> None:
    by_name = webhook_url.replace("127.0.0.1", "localhost")
    sink = WebhookSink(by_name, sleep=lambda _: None)  # a name is checked at every send
    with pytest.raises(ConfigurationError, match="'localhost' resolves to .*loopback"):
        sink.post(an_alert())
    sink(an_alert())
    assert sink.flush(10) and (sink.sent, sink.failed) == (0, 1)
    assert _Collector.bodies == [] and "loopback" in caplog.text  # nothing was sent
    allowed = WebhookSink(by_name, allow_private=True)
    allowed.post(an_alert())
    assert len(_Collector.bodies) == 1 and _Collector.bodies[0]["host"].startswith("localhost:")


@pytest.mark.parametrize("kwargs, field", [({"retries": -1}, "retries"),
                                          ({"timeout": 0}, "timeout"),
                                          ({"backoff": float("nan")}, "backoff")])
def test_webhook_settings_are_checked(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        WebhookSink("https://hooks.example.com/x", **kwargs)
