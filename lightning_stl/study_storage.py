"""The Optuna study of a durable sweep (:mod:`lightning_stl.sweeper`), created or loaded from its
storage: a SQLite file (opened by one sweep process at a time) or a database URL, with one
message when it cannot be opened."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy


def open_study(
    storage: str | None,
    study_name: str | None,
    sampler: Any,
    directions: list[Any],
    pruner: Any | None = None,
) -> optuna.Study:
    """Create or load the study, one process at a time per SQLite file (see
    :func:`_sqlite_setup_lock`); SQLite connections wait up to 120 s for the file's lock."""
    url = storage
    try:
        with _sqlite_setup_lock(storage):
            if isinstance(storage, str) and storage.startswith(JOURNAL):
                storage = journal_storage(storage)
            elif isinstance(storage, str) and storage.startswith("sqlite"):
                # several sweep processes on one SQLite file wait for its lock instead of failing
                storage = optuna.storages.RDBStorage(
                    storage, engine_kwargs={"connect_args": {"timeout": 120}}
                )
            return optuna.create_study(
                study_name=study_name,
                storage=storage,
                sampler=sampler,
                pruner=pruner or optuna.pruners.NopPruner(),  # Optuna's default: median
                directions=directions,
                load_if_exists=True,
            )
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, OSError, ImportError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        raise ValueError(
            f"hydra.sweeper.storage={url!r} cannot be opened "
            f"({type(error).__name__}: {reason[0] if reason else ''}); nothing was run. Give "
            "sqlite:///<existing folder>/<file>.db, journal:///<existing folder>/<file>.log "
            "or a reachable database URL such as postgresql://user@host/db"
        ) from None


#: ``journal:///abs/path/study.log`` (or ``journal://relative/path.log``): Optuna's
#: ``JournalStorage`` on a file, for shared file systems where SQLite's locks are unreliable.
JOURNAL = "journal://"


def journal_storage(url: str) -> optuna.storages.JournalStorage:
    """Optuna's journal storage on the file of ``url`` (its folder must exist)."""
    from optuna.storages.journal import JournalFileBackend

    path = Path(url[len(JOURNAL) :])
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} of the journal file does not exist")
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@contextlib.contextmanager
def _sqlite_setup_lock(storage: Any) -> Iterator[None]:
    """Hold ``<file>.lock`` while a sweep opens a SQLite study file (``sqlite:///path``).

    Optuna creates the schema of a new file (tables, then an Alembic version stamp) in several
    transactions; two sweeps started together on a new file both stamp it and one dies with
    ``UNIQUE constraint failed: alembic_version.version_num``. SQLite's own lock does not cover
    that sequence, so opening the study is serialised with a file lock beside the database; the
    trials then run concurrently as before.
    """
    database = None
    if isinstance(storage, str):
        url = sqlalchemy.engine.make_url(storage)
        if url.get_backend_name() == "sqlite":
            database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        yield  # another database, or an in-memory one: nothing to share
        return
    import fcntl  # POSIX; imported here so that the sweeper imports everywhere

    path = Path(database)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} of the SQLite file does not exist")
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
