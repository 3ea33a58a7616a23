"""The one error type the allocation policies raise for bad input."""

from steps.core.errors import TailwiseError


class AllocationError(TailwiseError, ValueError):
    """Bad metrics table or policy options; the message is one line naming the input."""
