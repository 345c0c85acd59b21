"""User-facing errors.

Every problem caused by input (a bad path, an empty corpus, NaN weights, an impossible budget) is raised as a
:class:`KappaTuneError` with a message that names the problem and what to do. The CLI prints that one line and
exits non-zero; Python users can catch the class. Anything else escaping is a bug in kappatune.
"""

from __future__ import annotations


class KappaTuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(KappaTuneError, ValueError):
    """An invalid configuration value (budget, rank, unknown key, ...)."""


class DataError(KappaTuneError, ValueError):
    """A corpus or data file that cannot be used (missing, empty, too short, not UTF-8, ...)."""


class ModelError(KappaTuneError):
    """A model that cannot be loaded or analysed (missing path, NaN weights, no analysable weight, ...)."""


class CacheError(KappaTuneError):
    """A cache, adapter or checkpoint that does not belong to this model or is corrupt."""


class UsageError(KappaTuneError, RuntimeError):
    """The API was called out of order (e.g. ``trainable_parameters()`` before ``prepare()``).

    A real exception rather than ``assert`` so that it also fires under ``python -O``.
    """


def require_prepared(method: object) -> None:
    """Raise :class:`UsageError` unless ``method.prepare(model)`` has been called."""
    if getattr(method, "model", None) is None:
        name = getattr(method, "name", type(method).__name__)
        raise UsageError(f"method {name!r} is not prepared yet: call method.prepare(model) first")
