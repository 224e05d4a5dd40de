"""phibroker: workflows for teams of AI agents, on Redis Streams.

The public API: `Agent` for the commands and subscriptions a worker serves, `Client` to submit and
follow workflows, `Retryable` for a handler's "try again", `BudgetExhausted` for the `ctx.spend` call
that passes a `fail` budget, `PhibrokerError` for what callers catch.
"""

from phibroker.errors import BudgetExhausted, PhibrokerError, Retryable
from phibroker.runtime.agent import Agent
from phibroker.runtime.client import Client

__all__ = ["Agent", "BudgetExhausted", "Client", "PhibrokerError", "Retryable", "__version__"]
__version__ = "0.1.0"
