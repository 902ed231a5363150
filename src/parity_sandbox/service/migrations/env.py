"""Alembic's entry point for the service's store: run by ``Store.migrate`` on the connection it
passes (``config.attributes["connection"]``); there is no alembic.ini."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
