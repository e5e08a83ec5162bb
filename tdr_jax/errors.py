"""Errors for expected bad input: settings, data files, workdirs.

`experiments/run.py` prints an `InputError` as one line (`error: <message>`) on stderr and
exits with status 2; any other exception is a bug and keeps its traceback. `InputError`
subclasses `ValueError`, so code that catches `ValueError` still does.
"""


class InputError(ValueError):
  """Bad input the user can fix: a setting, a flag combination, a data file, a workdir."""


class MissingFileError(InputError, FileNotFoundError):
  """A data file or folder that is not there (also a `FileNotFoundError`)."""


class UnknownNameError(InputError, KeyError):
  """An unknown dataset (or other registry) name (also a `KeyError`)."""

  __str__ = BaseException.__str__  # KeyError would quote the message
