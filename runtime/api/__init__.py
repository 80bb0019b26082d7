"""The runtime's HTTP API (FastAPI) in front of the scheduler, one job per module.

service.Runtime      model manager + scheduler + metrics + watchdog: what every front end serves through
synthesis            the synthesis service: admit, plan, queue, await, a stream's audio in order (no HTTP)
responses            a speech request -> its HTTP answer (both endpoints); the plain answer
streaming            the chunked answer: per-format piece encoding, what can stream
openai               /v1/audio/speech: OpenAI voice aliases and field mapping
schemas              request bodies and their validation
errors               HttpError, the one JSON error shape, the exception handlers
record               AccessRecord: one request's access-log line and metrics, filled in by handlers
access               the outermost ASGI layer: request id, body limit, UTF-8, access log, request metrics
metrics              the Prometheus registry
app.create_app       wiring: routes, handlers, lifespan, the access layer around it all

Import what you need from its module (`from runtime.api.app import create_app`); this package
file imports nothing, so a front end that needs only the service does not load FastAPI's routes.
"""
