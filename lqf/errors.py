"""The one exception type that means "the user gave bad input"."""


class UserError(Exception):
  """Bad input that the user can fix.

  The command line prints the message as one line, without a traceback, and exits
  with status 2. The message says what is wrong and how to fix it.
  """


def require(condition: bool, message: str) -> None:
  """Raises `UserError(message)` unless `condition` holds."""
  if not condition:
    raise UserError(message)


class NonFiniteLossError(UserError):
  """The training loss became NaN or infinite."""
