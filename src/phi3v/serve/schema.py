"""The OpenAPI schema: FastAPI's, plus the request bodies and error responses of the routes that parse their own."""

from __future__ import annotations

from .protocol import ChatRequest, CompletionRequest

ERROR_BODY = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
RESPONSES = {code: {"description": what, "content": {"application/json": {"schema": ERROR_BODY}}}
                   for code, what in [(400, "Bad request"), (401, "Missing or invalid API key"),
                                      (404, "Model not served here"), (408, "Request body stalled"),
                                      (413, "Request body or image too large"), (429, "Queue full")]}
# 200: the whole response as JSON, or with "stream": true server-sent events
RESPONSES[200] = {"description": "The completion", "content": {
    "application/json": {"schema": {"type": "object"}},
    "text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}}}}}


def openapi_schema(app, served_name: str) -> dict:
    """FastAPI's schema, with the request bodies the routes parse themselves declared (for schema-based fuzzers):
    ChatRequest and CompletionRequest, `model` being the one served name."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (("/v1/chat/completions", ChatRequest), ("/v1/completions", CompletionRequest)):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            body["properties"]["model"] = {"type": "string", "enum": [served_name]}
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema
