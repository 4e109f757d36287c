"""Exceptions. A :class:`UserError` is a problem with the user's input: the CLI prints its
message as one line, without a traceback, and exits with status 2."""


class LayerHessiansError(Exception):
    """Base class of every error this package raises on purpose."""


class UserError(LayerHessiansError, ValueError):
    """Bad input from the user (flag, name, path, data); the message says what to do."""


class DatasetMissingError(UserError):
    """A dataset's files are absent and could not be downloaded."""


class SettingError(UserError):
    """A :class:`UserError` about settings that are spelled differently in the Python API
    (``reorthogonalize=False``) and on the command line (``--hessian-reorthogonalize none``).

    ``template`` holds ``{key}`` fields; ``names`` maps each key to ``(api, cli)``
    spellings. ``str(err)`` is the API's message; :meth:`spelled` ``("cli")`` the CLI's
    (the ``layerhessians`` command prints that one).
    """

    def __init__(self, template: str, names: dict):
        self.template, self.names = template, dict(names)
        super().__init__(self.spelled("api"))

    def spelled(self, interface: str) -> str:
        """The message with the ``"api"`` or ``"cli"`` spellings filled in."""
        index = {"api": 0, "cli": 1}[interface]
        return self.template.format(**{key: pair[index] for key, pair in self.names.items()})
