"""The floor the ingest benchmark compares against: a Flask app that reads the body and answers 202.

It runs under the same gunicorn.conf.py as the service (workers, worker class, keep-alive, logger),
so the ratio `service / bare` says what the relay's own work costs, nothing else:

    gunicorn -c gunicorn.conf.py 'bench.bare_app:create_app()'
"""

from __future__ import annotations

from flask import Flask, Response, request

# An answer of the same shape and size as the service's event_processing_response.
_ANSWER = (
    b'{"type":"event_processing_response","id":"00000000-0000-4000-8000-000000000000",'
    b'"timestamp_ms":1764000000000,"firehose_version":"3.2.0"}'
)


def create_app() -> Flask:
    app = Flask("bare_firehose")

    @app.post("/firehose")
    @app.post("/firehose/<path:_anything>")
    def receive(_anything: str | None = None) -> Response:
        request.get_data(cache=False)
        return Response(_ANSWER, status=202, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', mimetype="application/json")

    return app
