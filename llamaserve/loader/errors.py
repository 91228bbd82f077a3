"""The one error type a model load raises: its message is what the user sees, without a traceback."""


class ModelLoadError(ValueError):
    """A model that cannot be loaded: missing, not a model, corrupt, or of an unsupported kind."""
