"""Transports: the OpenAI-style HTTP face and the gRPC link between machines."""
