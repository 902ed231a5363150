"""The sandbox as a service: ``parity-sandbox serve`` (extra ``[service]``).

- ``store``: API keys and the durable task queue (SQLAlchemy Core; SQLite or PostgreSQL),
  its schema made by Alembic (``migrations/``).
- ``dispatch``: takes queued tasks and runs them through the runtimes' executors.
- ``app``: the HTTP API (FastAPI) over both.
- ``server``: ``serve``: the store opened and migrated, stale work recovered, uvicorn run.

The package imports nothing itself: the library stays usable without the extra.
"""
