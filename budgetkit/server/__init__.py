"""The HTTP API and dashboard (``pip install 'budgetkit[server]'``).

    from budgetkit.server import create_app
    app = create_app(engine, tokens={"admin-secret": None, "alice-secret": "alice"})

``budgetkit serve`` runs it with uvicorn. FastAPI is imported only here, never by
``import budgetkit``.
"""

from ._app import create_app, parse_tokens

__all__ = ["create_app", "parse_tokens"]
