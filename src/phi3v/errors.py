"""The one exception type for errors a user can cause (bad path, bad checkpoint, bad image, prompt too long)."""


class Phi3VError(ValueError):
    """A user-facing error whose message says what went wrong and what to do."""


class CheckpointError(Phi3VError):
    """A checkpoint folder is missing, incomplete or does not match its config."""


class InputError(Phi3VError):
    """A prompt, image or request that cannot be processed as given."""


class ContextLengthError(InputError):
    """A request that does not fit in the context or KV-cache budget."""
