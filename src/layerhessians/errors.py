"""Exceptions. A :class:`UserError` is a problem with the user's input: the CLI prints its
message as one line, without a traceback, and exits with status 2.

:func:`unknown_name` builds the one refusal message for a name that is not among the
choices (a model, dataset, metric...), with a "did you mean" suggestion for near misses.
"""

import difflib

#: Similarity (``difflib.SequenceMatcher.ratio``, 0-1) a choice needs to be suggested.
SUGGESTION_CUTOFF = 0.6  # difflib.get_close_matches default
#: How far below the best match another choice may score and still be suggested.
SUGGESTION_MARGIN = 0.1


class LayerHessiansError(Exception):
    """Base class of every error this package raises on purpose."""


class UserError(LayerHessiansError, ValueError):
    """Bad input from the user (flag, name, path, data); the message says what to do."""


class NonFiniteError(UserError):
    """A curvature product (or a Lanczos step, or a loss the engine probes) came out with NaN
    or infinite entries."""


class DatasetMissingError(UserError):
    """A dataset's files are absent and could not be downloaded."""


def suggest(name, choices) -> list:
    """The choices closest to ``name``, best first, compared case-insensitively by
    :class:`difflib.SequenceMatcher` ratio (as :func:`difflib.get_close_matches` does): those
    scoring at least :data:`SUGGESTION_CUTOFF` and within :data:`SUGGESTION_MARGIN` of the best.

    Args:
        name: what the user typed (any object; its ``str`` is compared).
        choices: the valid names, in their canonical spelling.

    Returns:
        Canonical spellings from ``choices`` (``[]`` if none is close).
    """
    typed = str(name).strip().lower()
    scored = []
    for choice in dict.fromkeys(str(c) for c in choices):
        matcher = difflib.SequenceMatcher(None, typed, choice.lower())
        if matcher.real_quick_ratio() >= SUGGESTION_CUTOFF and matcher.ratio() >= SUGGESTION_CUTOFF:
            scored.append((matcher.ratio(), choice))
    if not scored:
        return []
    best = max(score for score, _ in scored)
    return [choice for score, choice in sorted(scored, key=lambda item: -item[0])
            if score >= best - SUGGESTION_MARGIN]


def unknown_name(kind: str, name, choices) -> UserError:
    """The error for a ``name`` that is not one of ``choices``, to be raised by the caller.

    Args:
        kind: what the name names, e.g. ``"model"`` or ``"dataset"``.
        name: what the user gave.
        choices: the valid names, in their canonical spelling and listing order.

    Returns:
        A :class:`UserError` whose one-line message is ``unknown model 'LeNett'; choose one
        of LeNet, VGG11, VGG11_bn, ResNet18 (did you mean 'LeNet'?)``, the "did you mean"
        part only when a choice is close (see :func:`suggest`).
    """
    choices = [str(c) for c in choices]
    close = suggest(name, choices)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return UserError(f"unknown {kind} {name!r}; choose one of {', '.join(choices)}{hint}")


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


def check_choice(value, choices, what: str) -> None:
    """Refuse ``value`` unless it is one of ``choices``: the one check behind every
    ``"WHAT must be one of ...; got VALUE"`` message, with a close match where one exists.

    Args:
        value: what was given.
        choices: the valid values, in listing order.
        what: the setting's name (an argument or option).

    Raises:
        UserError: ``value`` is not one of ``choices``.
    """
    if value not in choices:
        close = suggest(value, choices) if isinstance(value, str) else []
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UserError(f"{what} must be one of {', '.join(map(str, choices))}; "
                        f"got {value!r}{hint}")
