"""Exception types. Every error genbackends raises on bad input is one of these, with a message
that names the offending field, prompt, tensor or plugin and says what to change."""


class GenBackendsError(Exception):
    """Base class of all genbackends errors (the CLI prints these as one line)."""


class ConfigError(GenBackendsError, ValueError):
    """A config file or value is invalid; the message names the field path and the bad value."""


class PromptError(GenBackendsError, ValueError):
    """A prompt or prompt source is invalid; the message names the prompt's index or file."""


class PluginError(GenBackendsError):
    """A plugin failed to load, or a backend/adapter name is unknown or claimed twice."""


class WeightSyncError(GenBackendsError):
    """A weight sync was rejected before any byte was written (names, shapes, dtypes, coverage),
    or failed; the engine keeps serving the previous weights."""


class BackendStateError(GenBackendsError, RuntimeError):
    """A backend method was called in a state that does not allow it (e.g. after shutdown)."""
