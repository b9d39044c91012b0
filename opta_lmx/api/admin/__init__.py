"""The admin API: reads status and edits the desired state. Never imports the engine.

Laid out as vLLM's entrypoints are: `router` (HTTP only), `protocol` (request models, If-Match,
status codes), `serving` (the logic, returning values), `edits` (the models.yaml edits behind
each write) and `events` (the SSE stream).
"""
