"""The base of every error that a user's input or files can cause.

The CLI prints such an error as one line (`cacherl CMD: error: ...`, exit status 2) instead of a
traceback, without importing the modules that raise them. This module sits below every layer.
"""


class UserError(Exception):
    """Bad input (a config, a file, a flag, a checkpoint): the message says what and where."""
