"""Engine errors that callers tell apart."""


class PromptTooLongError(ValueError):
    """The prompt does not fit ``max_model_len`` (with room for at least one generated token)."""
