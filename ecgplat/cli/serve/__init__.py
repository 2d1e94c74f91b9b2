"""The online service of `ecgplat serve`: queries, predictions, embeddings and records over HTTP,
and the web page that shows them.

It lives inside the command line, the one part of `ecgplat` that composes the other layers
(`ingestion`, `training`, `retrieval`), and only `ecgplat serve` starts it.
Modules: `settings` (the service's options and limits), `tokens`
(bearer tokens, scopes, the per-token rate limit), `uploads` (an uploaded ECG read by the
ingest's readers and conditioning), `state` (the model, index and store loaded once, and their
hot reload), `answers` (what the routes compute in worker threads), `guards` (the body-size
cap, the time limit and the access log as ASGI middleware), `app` (the FastAPI app and its
routes), `static/` (the page).
"""
