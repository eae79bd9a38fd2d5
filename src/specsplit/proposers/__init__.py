"""Proposers (drafters): a draft model on any backend, n-gram prompt lookup."""
