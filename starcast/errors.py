"""The one exception type that means "the user gave us something wrong": printed as one line, exit code 2."""


class UserError(Exception):
    """A problem with the user's input (a path, a checkpoint, an option), not a bug in starcast."""
