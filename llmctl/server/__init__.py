"""The OpenAI-compatible server: a batching engine (engine.py) behind a FastAPI app (app.py)."""
