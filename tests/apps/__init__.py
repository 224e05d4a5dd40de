"""Agents used by the integration tests (loaded with `phibroker worker --app tests.apps.NAME`)."""
