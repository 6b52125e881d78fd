"""The runtime layer: every decision that depends on the machine a model runs on (runtime/probe.py asks
what the machine can really do)."""
