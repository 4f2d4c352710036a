"""The OpenAI-compatible server: protocol (request and response schemas), worker (the engine thread), app."""
