"""The HTTP API and dashboard (``pip install 'budgetkit[server]'``).

    from budgetkit.server import create_app
    app = create_app(engine, tokens={"admin-secret": None, "alice-secret": "alice"})

``budgetkit serve`` runs it with uvicorn. FastAPI is imported only here, never by
``import budgetkit``.
"""

from ._app import (
    DEFAULT_TOKEN_FILE,
    TOKEN_FILE_ENV,
    TOKENS_ENV,
    admin_token_from_file,
    create_app,
    parse_tokens,
)

__all__ = ["create_app", "parse_tokens", "admin_token_from_file", "TOKENS_ENV",
           "TOKEN_FILE_ENV", "DEFAULT_TOKEN_FILE"]
