"""The dashboard in a real browser: Debian's headless Chromium against a real uvicorn server.

The page must load its data with the token from the URL and draw every chart: the dumped
DOM holds SVG bars whose values are the API's figures, one gauge per budget window and
the alerts. A screenshot is kept in artifacts/dashboard.png. Skipped without chromium
(``apt-get install -y chromium``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")

from budgetkit import Engine  # noqa: E402
from budgetkit.server import create_app  # noqa: E402

from .conftest import FakeClock  # noqa: E402
from .test_server import ADMIN, NOW, ServerThread, populate  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = [pytest.mark.skipif(CHROMIUM is None,
                                 reason="chromium is not installed (apt-get install -y chromium)"),
              pytest.mark.slow]  # a real browser; CI runs it


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--no-first-run", "--disable-extensions", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400",
               "--virtual-time-budget=15000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture
def server(tmp_path: Path):  # noqa: ANN201
    clock = FakeClock(NOW)
    with Engine(db=str(tmp_path / "dash.db"), clock=clock) as engine:
        populate(engine, clock)
        with ServerThread(create_app(engine, tokens={ADMIN: None})) as running:
            yield running


def attr_values(dom: str, tag_pattern: str, attr: str) -> list[str]:
    return [m.group(1) for m in re.finditer(tag_pattern + r'[^>]*?' + attr + r'="([^"]*)"', dom)]


def test_dashboard_loads_data_and_draws_charts(server: ServerThread, tmp_path: Path) -> None:
    url = f"{server.url}/dashboard#token={ADMIN}"
    result = chromium(tmp_path, "--dump-dom", url)
    dom = result.stdout
    assert 'data-state="loaded"' in dom, (dom[-2000:], result.stderr[-2000:])
    assert 'data-calls="20"' in dom

    daily = dom[dom.index('id="chart-daily"'):dom.index("</svg>", dom.index('id="chart-daily"'))]
    assert 'data-points="31"' in daily
    values = [float(v) for v in attr_values(daily, r"<rect", "data-value")]
    assert len(values) == 31 and sum(1 for v in values if v > 0) == 3  # three days of usage
    days = attr_values(daily, r"<rect", "data-day")
    assert days[-1] == NOW.date().isoformat()

    models = dom[dom.index('id="chart-models"'):]
    model_values = [float(v) for v in attr_values(models[:models.index("</svg>")], r"<rect",
                                                  "data-value")]
    assert len(model_values) == 2 and all(v > 0 for v in model_values)
    assert "gpt-4o" in models[:models.index("</svg>")]

    gauges = attr_values(dom, r"<svg", "data-percent")
    assert len(gauges) == 3  # per-user (alice, bob) and global windows
    assert dom.count('class="gauge-fill"') == 3
    assert dom.count('<tr class="alert">') >= 1
    assert re.search(r'id="kpi-cost">\$0\.\d+<', dom)


def test_dashboard_screenshot_is_kept_as_an_artifact(server: ServerThread,
                                                     tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "dashboard.png"
    if target.exists():
        target.unlink()
    chromium(tmp_path, f"--screenshot={target}", f"{server.url}/dashboard#token={ADMIN}")
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_dashboard_without_a_token_asks_for_one(server: ServerThread, tmp_path: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", f"{server.url}/dashboard").stdout
    assert 'data-state="needs-token"' in dom
    assert "<h1>budgetkit</h1>" in dom
