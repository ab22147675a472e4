"""The one exception type users see: its message names the file, key or value and says what to do."""


class PtuneError(Exception):
    """A problem the user can fix; the CLI prints the message without a traceback and exits 2."""
