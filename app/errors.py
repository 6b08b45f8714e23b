"""The errors that end a command with one line and exit status 2, shared by serve and model setup (so
neither needs to import the other)."""


class StartupError(Exception):
    """A problem found while starting, worded as the one line the user gets (exit status 2)."""
