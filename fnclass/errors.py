"""The base of every bad-input error, in a module with no imports, so the CLI can catch it without loading torch."""


class InputError(ValueError):
    """A config, data folder, checkpoint or flag is invalid; the message is one line naming the problem and the fix."""
