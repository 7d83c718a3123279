"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): protocol models, request planning, app.
`python -m kvjax.serve` is the command line."""
