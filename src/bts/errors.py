"""The one exception type users see: a single line naming the problem and the fix."""


class BtsError(Exception):
    """Bad input or state that the user can fix; the CLI prints it as one line and exits 1."""
