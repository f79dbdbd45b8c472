"""Errors a user can fix; the CLI prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input to a pipeline or command (path, model, data, configuration): the message says how to fix it."""
