"""The router's HTTP API: the FastAPI app, /generate, the OpenAI routes and their schemas, errors and streaming."""
