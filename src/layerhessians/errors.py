"""Exceptions. A :class:`UserError` is a problem with the user's input: the CLI prints its
message as one line, without a traceback, and exits with status 2."""


class LayerHessiansError(Exception):
    """Base class of every error this package raises on purpose."""


class UserError(LayerHessiansError, ValueError):
    """Bad input from the user (flag, name, path, data); the message says what to do."""


class DatasetMissingError(UserError):
    """A dataset's files are absent and could not be downloaded."""
