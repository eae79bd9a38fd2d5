"""Failures under load: `specsplit serve` killed, soaked and fuzzed (see ``__main__``)."""
