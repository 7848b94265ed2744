"""Frame-relevance scores and top-k selection of bank slots."""

from .op import select_sinks, select_sinks_op

__all__ = ["select_sinks", "select_sinks_op"]
