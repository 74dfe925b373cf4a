"""Providers over real HTTP against their simulators, one folder per API (and the spec engine)."""
