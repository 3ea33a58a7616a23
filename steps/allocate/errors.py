"""The one error type the allocation policies raise for bad input."""


class AllocationError(ValueError):
    """Bad metrics table or policy options; the message is one line naming the input."""
