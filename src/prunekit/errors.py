"""The one exception type for mistakes a user can fix; the CLI turns it into a message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user (a path, a name, a number); the message says what to do instead."""
