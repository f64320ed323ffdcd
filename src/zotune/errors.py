"""User-facing errors.

Anything a user can cause (bad config, missing file, unknown model, empty data) raises
:class:`ZotuneError` with one clear line. The CLI prints it as ``zotune: error: <message>``
and exits non-zero, without a traceback. Programming errors stay ordinary exceptions.
"""


EXIT_INTERRUPTED = 130  # a command stopped by Ctrl-C or SIGTERM (a run checkpointed: the same command goes on)


class ZotuneError(Exception):
    """An error caused by user input, reported as one line without a traceback."""


class ConfigError(ZotuneError):
    """Invalid configuration: unknown key, wrong type, value out of range."""


class DataError(ZotuneError):
    """Missing, unreadable, empty or inconsistent data."""


class ModelError(ZotuneError):
    """A model that cannot be found or loaded."""


class TrainingError(ZotuneError):
    """A run that cannot go on: a loss that stays non-finite, out of memory on a batch."""
