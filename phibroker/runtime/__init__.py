"""The processes and the API built on the store: agents, workers, coordinators, events, the client."""
