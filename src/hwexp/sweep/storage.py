"""Optuna storages a sweep can share between workers (SQLite, PostgreSQL): URL
normalisation, masking, opening with retries, failing trials whose heartbeat stopped."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import RDBStorage

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
POSTGRESQL_PREFIX = "postgresql://"
SQLITE_BUSY_TIMEOUT_S = 60
STORAGE_ATTEMPTS = 5  # to open a storage whose tables another worker is creating


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's experimental-feature warnings (heartbeats, matplotlib plots) and its
    warning that heartbeats are meant for ``Study.optimize`` (here ask/tell sends them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


# --------------------------------------------------------------------------- storage


def normalized_storage_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute (against the current directory) and
    the database's folder created; ``postgresql://`` gets the psycopg (3) driver that hwexp
    installs (SQLAlchemy 2.0 would pick psycopg2); other URLs unchanged."""
    if url.startswith(POSTGRESQL_PREFIX):
        return "postgresql+psycopg://" + url[len(POSTGRESQL_PREFIX) :]
    if not url.startswith(SQLITE_PREFIX):
        return url
    path, sep, query = url[len(SQLITE_PREFIX) :].partition("?")
    if path in ("", ":memory:"):
        raise ValueError(f"storage {url!r}: an Optuna sweep needs a database file or a server")
    resolved = Path(path).expanduser().resolve()
    resolved.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{resolved}{sep}{query}"


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and MLflow)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: show its scheme only
        return url.split("://", 1)[0] + "://***"


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    retry_interrupted: bool = False,
) -> RDBStorage:
    """An Optuna ``RDBStorage`` at ``url`` (SQLite waits up to a minute for a lock).

    With ``heartbeat_interval`` (seconds), RUNNING trials whose heartbeat is older than
    ``grace_period`` (default twice the interval) are stale and failed by ``fail_stale_trials``;
    ``retry_interrupted`` then enqueues each failed one again with the same parameters.
    """
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    callback = None
    if retry_interrupted and heartbeat_interval:
        with quiet_optuna():
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with quiet_optuna():
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval or None,
                    grace_period=grace_period or None,
                    heartbeat_stale_trial_callback=callback,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # workers starting at once on a new database race to create its tables: theirs
            # stand, and the next attempt finds them
            if not _lost_table_race(error) or attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


_DUPLICATE_SQLSTATES = {"42P07", "42710", "23505"}  # duplicate table, object, unique key


def _lost_table_race(error: sqlalchemy.exc.DBAPIError) -> bool:
    """True when ``error`` says that another process created the same table first: SQLite's
    IntegrityError, or PostgreSQL's duplicate table/object/key (``relation "studies" already
    exists``, which a concurrent ``CREATE TABLE`` raises)."""
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _DUPLICATE_SQLSTATES
    return isinstance(error, sqlalchemy.exc.IntegrityError)


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the RUNNING trials whose process stopped sending heartbeats as FAIL."""
    with quiet_optuna():
        optuna.storages.fail_stale_trials(study)
