"""The two errors a user sees as one line (exit code 2). A leaf: imports nothing from prunerep."""


class ConfigError(ValueError):
    """Bad user input, reported as one line before any heavy work starts."""


class ModelUnavailable(RuntimeError):
    """The weights cannot be had here (offline, gated, missing): one line for the user."""
