"""The one exception type the CLI turns into a one-line message (no traceback without --debug)."""


class UserError(Exception):
    """Bad input: a config, a path, a store. The message names the problem and how to fix it."""
