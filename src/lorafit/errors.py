"""User-facing errors: one exception type the CLI turns into a clear message and exit code 2."""


class LorafitError(Exception):
    """A problem the user can fix (bad input, missing package, no network...).

    The message says what is wrong, where (file, line, field) and what to do.
    """
