"""Upstream provider verification: evidence adapters, policies and leases."""
