"""Budget alerts and where they go.

An alert fires once per kind (threshold, level, blocked) per budget window, across
processes: the budget book stores the alert row under a unique key first and only the
process whose insert won calls the sinks. A sink is any callable taking an
:class:`Alert`; :class:`LoggingSink` and :class:`WebhookSink` are ready-made.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Alert", "AlertSink", "LoggingSink", "WebhookSink"]

logger = logging.getLogger("budgetkit.alerts")

AlertSink = Callable[["Alert"], None]


@dataclass(frozen=True)
class Alert:
    """A budget crossed a threshold or level, or stopped a call.

    ``kind`` is ``"threshold"`` (``threshold`` is the fraction of the limit, from
    ``Budget.alert_at``), ``"level"`` (``level`` is moderate / high / critical) or
    ``"blocked"`` (a call was stopped). Amounts are in the budget's unit: dollars or tokens.
    """

    budget: str
    kind: str
    level: str
    threshold: float | None
    period: str
    unit: str
    scope_key: str
    window_start: dt.datetime
    spent: float
    reserved: float
    limit: float
    percentage: float
    message: str
    created_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_start"] = self.window_start.isoformat()
        data["created_at"] = self.created_at.isoformat()
        return data


_LOG_LEVELS: Mapping[str, int] = {"normal": logging.WARNING, "moderate": logging.WARNING,
                                  "high": logging.ERROR, "critical": logging.CRITICAL}


class LoggingSink:
    """Logs each alert on ``budgetkit.alerts``: moderate as WARNING, high as ERROR,
    critical (and blocked calls) as CRITICAL."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logger

    def __call__(self, alert: Alert) -> None:
        self.log.log(_LOG_LEVELS.get(alert.level, logging.WARNING), "%s", alert.message)


class WebhookSink:
    """POSTs each alert as JSON to ``url`` from a background thread.

    The call being admitted never waits for the webhook. Failures are logged, not raised.
    :meth:`flush` waits until every queued alert was posted (tests, shutdown).
    """

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 timeout: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            from budgetkit.errors import ConfigurationError

            raise ConfigurationError(
                f"webhook url must start with http:// or https://, got {url!r}")
        self.url = url
        self.headers = {"Content-Type": "application/json", **dict(headers or {})}
        self.timeout = timeout
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[Alert | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, alert: Alert) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="budgetkit-webhook",
                                                daemon=True)
                self._thread.start()
        self._queue.put(alert)

    def post(self, alert: Alert) -> None:
        """Send one alert now (on the caller's thread)."""
        body = json.dumps(alert.as_dict()).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, headers=self.headers,
                                         method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            response.read()

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            try:
                if alert is None:
                    return
                self.post(alert)
                self.sent += 1
            except OSError as exc:  # URLError, HTTPError, timeouts are all OSError
                self.failed += 1
                logger.warning("budgetkit: webhook %s failed: %s", self.url, exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until queued alerts were sent (or failed). False on timeout."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)
