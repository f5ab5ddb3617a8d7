"""The one exception type a user is meant to see.

A `UserError` is bad input (a missing file, a config typo, a checkpoint of the
wrong kind): the stage scripts print its message as one line and exit with
status 2, without a traceback. Any other exception is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input the user can fix; the message names the file or key and what was expected."""
