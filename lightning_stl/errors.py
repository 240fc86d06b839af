"""What a user is told when a run cannot start: one line, no traceback.

Every check of a setting raises one of :data:`USER_ERRORS` with a message that names the value
and what is allowed (``data.target_size=5000 exceeds ...; allowed: 1 to 997``).
:func:`user_message` turns such an error, also when Hydra's ``instantiate`` wrapped it, into the
line the entry point prints; anything else is a bug and keeps its traceback.

The project's own exceptions take several arguments, which Python cannot pickle back from a
process pool by default (the worker's error arrives as ``BrokenProcessPool``);
:class:`PicklableError` makes them travel.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException


class PicklableError(Exception):
    """An exception whose constructor arguments are kept, so that it pickles with them.

    Subclasses call ``self._keep(args, kwargs)`` in ``__init__`` (before ``super().__init__``).
    """

    _init: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def _keep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._init = (args, kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        args, kwargs = self._init
        return (_rebuild, (type(self), args, kwargs))


def _rebuild(cls: type[Exception], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
    return cls(*args, **kwargs)


_TRAINING_STARTED = False


def mark_training_started() -> None:
    """Called at every training batch (``run_stage``): from then on an error is not one of the
    input (every setting is checked before the first batch) and keeps its traceback."""
    global _TRAINING_STARTED
    _TRAINING_STARTED = True


def training_started() -> bool:
    """Whether this process has begun a training batch."""
    return _TRAINING_STARTED


#: Errors that mean "this input is not allowed" (each check raises one of them).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    OmegaConfBaseException,
)


def user_message(error: BaseException) -> str | None:
    """The one-line message of an input error (``None``: not one, a bug to show in full).

    Hydra's ``InstantiationException`` is looked through to the error that the instantiated
    class raised (its ``__cause__``).
    """
    seen: set[int] = set()
    while isinstance(error, InstantiationException) and id(error) not in seen:
        seen.add(id(error))
        if error.__cause__ is None:
            return _one_line(str(error))
        error = error.__cause__
    if isinstance(error, USER_ERRORS):
        return _one_line(str(error) or type(error).__name__)
    return None


def unexpected_keyword(error: BaseException) -> str | None:
    """The argument name of a ``TypeError: ... got an unexpected keyword argument 'x'`` (also
    inside Hydra's ``InstantiationException``), else ``None``."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, TypeError):
        found = re.search(r"unexpected keyword argument '([^']+)'", str(error))
        if found:
            return found.group(1)
    return None


def parameters_of(target: Any) -> list[str]:
    """The keyword parameters of a class or function (for "its settings are ...")."""
    import inspect

    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [
        n
        for n, p in signature.parameters.items()
        if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY
        if n != "self"
    ]


def reports_input_errors(main: Callable[[], Any]) -> Callable[[], Any]:
    """Decorate a script's ``main``: an input error (also one raised in a worker process and
    sent back through a process pool) ends it with ``error: <message>`` and exit status 2."""

    @functools.wraps(main)
    def wrapped() -> Any:
        try:
            return main()
        except Exception as error:
            message = user_message(error)  # workers' errors: training_started() is theirs
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (``--jobs``)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: it must be an integer >= 1")
    return value


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
