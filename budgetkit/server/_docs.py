"""The API reference page at ``/docs``: rendered here from the app's own OpenAPI schema.

FastAPI's default ``/docs`` (Swagger UI) and ``/redoc`` load their scripts and stylesheets
from a CDN: the page breaks offline and tells a third party who opens the dashboard. This
page is one HTML document with inline styles, no script and no external reference; the
machine-readable schema stays at ``/openapi.json``.
"""

from __future__ import annotations

import html
import json
from typing import Any

__all__ = ["render_api_reference"]

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;
color:#1f2328;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin:2rem 0 .4rem}
code{font:13px ui-monospace,monospace;background:#f3f4f6;padding:.1rem .3rem;border-radius:4px}
.op{border:1px solid #d0d7de;border-radius:8px;padding:.6rem 1rem;margin:.8rem 0}
.method{font-weight:700;color:#0969da;margin-right:.5rem}
table{border-collapse:collapse;width:100%;margin:.4rem 0}
th,td{text-align:left;border-bottom:1px solid #eaeef2;padding:.25rem .5rem;vertical-align:top}
th{font-weight:600;color:#57606a}.muted{color:#57606a}
"""


def _type_of(schema: dict[str, Any]) -> str:
    """A short human reading of a parameter schema: ``integer 1..3660``, ``date``, ..."""
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    parts = []
    for option in options:
        kind = option.get("format") or option.get("type") or "any"
        bounds = []
        if "minimum" in option or "maximum" in option:
            bounds.append(f"{option.get('minimum', '')}..{option.get('maximum', '')}")
        if "exclusiveMinimum" in option:
            bounds.append(f"> {option['exclusiveMinimum']}")
        if "pattern" in option:
            bounds.append(f"pattern {option['pattern']}")
        if "minLength" in option:
            bounds.append(f"length >= {option['minLength']}")
        parts.append(" ".join([kind, *bounds]))
    return " or ".join(parts) or "any"


def _parameters(op: dict[str, Any]) -> str:
    rows = []
    for parameter in op.get("parameters", []):
        schema = parameter.get("schema", {})
        default = schema.get("default")
        rows.append(
            "<tr><td><code>{name}</code></td><td>{where}</td><td>{kind}</td><td>{req}</td>"
            "<td>{desc}</td></tr>".format(
                name=html.escape(parameter["name"]), where=html.escape(parameter["in"]),
                kind=html.escape(_type_of(schema)),
                req="required" if parameter.get("required") else (
                    f"default {html.escape(json.dumps(default))}" if default is not None
                    else "optional"),
                desc=html.escape(parameter.get("description", ""))))
    if not rows:
        return '<p class="muted">No parameters.</p>'
    return ("<table><tr><th>name</th><th>in</th><th>type</th><th></th><th>meaning</th></tr>"
            + "".join(rows) + "</table>")


def render_api_reference(schema: dict[str, Any]) -> str:
    """The reference page for an OpenAPI ``schema`` (``app.openapi()``)."""
    info = schema.get("info", {})
    sections: dict[str, list[str]] = {}
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict):
                continue
            tag = (op.get("tags") or ["other"])[0]
            codes = ", ".join(f"{html.escape(code)} {html.escape(r.get('description', ''))}"
                              for code, r in op.get("responses", {}).items())
            secured = "bearer token" if op.get("security") else "no token"
            sections.setdefault(tag, []).append(
                f'<div class="op"><div><span class="method">{html.escape(method.upper())}'
                f"</span><code>{html.escape(path)}</code> "
                f'<span class="muted">({secured})</span></div>'
                f"<p>{html.escape(op.get('description') or op.get('summary') or '')}</p>"
                f"{_parameters(op)}<p class=\"muted\">Responses: {codes}</p></div>")
    body = "".join(f"<h2>{html.escape(tag)}</h2>{''.join(ops)}" for tag, ops in sections.items())
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(info.get('title', 'API'))} API reference</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(info.get('title', 'API'))} API <small class=\"muted\">"
        f"{html.escape(str(info.get('version', '')))}</small></h1>"
        f"<p>{html.escape(info.get('description', ''))} Send "
        "<code>Authorization: Bearer &lt;token&gt;</code> with every request. The schema "
        'itself: <a href="/openapi.json"><code>/openapi.json</code></a>.</p>'
        f"{body}</body></html>")
