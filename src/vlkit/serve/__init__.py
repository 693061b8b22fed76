"""Put a trained model to work: embedding indexes and search (``vlkit embed`` / ``vlkit search``), and an
OpenAI-compatible HTTP API with a web page (``vlkit serve``; FastAPI + uvicorn, the ``vlkit[serve]`` extra)."""
