"""OpenAI-compatible HTTP server (`tinyvllm serve`). Needs the `server` extra (fastapi, uvicorn,
prometheus_client); nothing here imports them until the server is built, so the CLI stays light."""
