"""Signatures and Redis ACL users; uses the leaf modules only."""
