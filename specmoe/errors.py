"""Errors that the CLI turns into a one-line message instead of a traceback."""


class SpecmoeError(Exception):
    """Base class: the message says what was wrong and what is expected."""


class InputError(SpecmoeError):
    """Bad user input: a missing or malformed file, an unknown name, a bad option."""


class UnsupportedModelError(SpecmoeError):
    """The checkpoint's ``model_type`` has no adapter."""


class CorruptStoreError(SpecmoeError):
    """A trace store whose files do not match its manifest."""


class PeerError(SpecmoeError):
    """Under torchrun: another rank's error, already reported by that rank (printed once)."""
