"""`lucid serve`: an OpenAI-compatible HTTP server with continuous batching, and the explorer page.

    app.py            create_app(): routes, error handlers, guards
    engine.py         the engine thread: one BatchGenerator, requests join and leave between steps
    choices.py        one choice's tokens -> text deltas (UTF-8, stop strings, log-probs)
    openai_schema.py  request bodies -> engine jobs, checked with the library's own validation
    responses.py      OpenAI response bodies, whole and streamed
    http_errors.py    OpenAI-format errors; middleware.py: auth, body limit, request counts
    metrics.py        Prometheus text format; testing.py: serve_in_thread() for tests
    explorer.py       the explorer page and its introspection endpoints
"""

from .app import create_app
from .engine import Engine

__all__ = ["Engine", "create_app"]
