"""Engine errors that callers tell apart."""


class PromptTooLongError(ValueError):
    """The prompt does not fit ``max_model_len`` (with room for at least one generated token)."""


class EngineDeadError(RuntimeError):
    """The engine cannot run another step (a tensor-parallel rank died or a collective failed): the process
    that owns it should end, so that its requests go to another one."""


class NothingToDraw(ValueError):
    """A request's own token rules (``allowed_token_ids``, ``bad_words``, ``min_tokens``, a grammar) left no token
    to draw at some step: it ends with this error rather than with a token none of them allows."""
