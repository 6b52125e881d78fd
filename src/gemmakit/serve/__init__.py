"""The OpenAI-compatible server: app.py (the FastAPI app), routes.py (endpoints), server.py (shared state and
checks), protocol.py (wire format), choices.py (text -> message fields), loop.py (continuous batching),
metrics.py (Prometheus)."""
