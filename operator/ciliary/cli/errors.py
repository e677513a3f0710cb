"""The CLI's one user-facing error type: shown as a single line, exit status 1."""


class UserError(RuntimeError):
    """An error to show the user as one line."""
