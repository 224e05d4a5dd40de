"""phibroker: workflows for teams of AI agents, on Redis Streams."""

from phibroker.errors import PhibrokerError, Retryable

__all__ = ["PhibrokerError", "Retryable"]
__version__ = "0.1.0"
