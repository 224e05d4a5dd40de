"""Bridges to other systems: RQ."""
