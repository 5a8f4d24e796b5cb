"""The errors the library anticipates: a user's input that cannot work (a flag, a file, a folder).

They subclass the built-in types the original raised (ValueError, FileNotFoundError,
NotImplementedError), so code that catches those keeps working. The scripts print
their message without a traceback (cli.run); any other exception is a bug and keeps
its traceback.
"""

import contextlib


class UserError(ValueError):
    """Bad input: the message names the file or value and the fix. The scripts exit with 1."""

    exit_code = 1


class UsageError(UserError):
    """A bad flag or flag value. The scripts exit with 2, as argparse does."""

    exit_code = 2

    def __init__(self, message, usage=""):
        super().__init__(message)
        self.usage = usage  # the script's usage line, printed before the message


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named by a flag does not exist."""


class UnknownChoiceError(UsageError, NotImplementedError):
    """A name (a schedule, a sampler) outside the known ones; the original raised NotImplementedError."""


@contextlib.contextmanager
def flag_errors(*types):
    """Turn the ValueErrors (or `types`) of code called with flag values into UsageErrors.

    The math core (gaussian_diffusion, respace, resample) stays free of this module: the
    factories that pass it flag values wrap the call instead.
    """
    caught = types or (ValueError,)
    try:
        yield
    except UserError:
        raise
    except caught as exc:
        error = UnknownChoiceError if isinstance(exc, NotImplementedError) else UsageError
        raise error(str(exc)) from exc
