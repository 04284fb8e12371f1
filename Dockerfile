# One image for every role; only the command differs:
#   web     (default)  gunicorn -c gunicorn.conf.py "service:create_app()"
#   worker             celery -A workers.worker worker --loglevel INFO --queues firehose --without-mingle --without-gossip
#   flower             celery -A workers.worker flower --port=5555
#   partner stub (dev) python -m devtools.partner_stub --host 0.0.0.0 --port 9400
# Pin the base by digest in your own registry for byte-for-byte rebuilds.

# ---- builder: the virtualenv, from wheels only -------------------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Every pinned dependency ships manylinux wheels for amd64 and arm64, so --only-binary keeps
# compilers out of both stages and makes a dependency that would need one fail the build loudly.
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt

# ---- runtime -----------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

# The same path as in the builder: the venv's scripts carry it in their shebangs.
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLASK_APP=service:create_app \
    PORT=8000

RUN groupadd --system --gid 10001 relay \
 && useradd --system --no-log-init --uid 10001 --gid relay --home-dir /nonexistent --shell /usr/sbin/nologin relay

WORKDIR /app
# The code after the dependencies, so a code change rebuilds only this layer. Owned by root:
# the service user can read it but not change it. .dockerignore lets in only what runs.
COPY . .
RUN python -m compileall -q /app

# Numeric, so orchestrators can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001

EXPOSE 8000 5555

# The web's liveness; worker and flower containers get their own check from compose and the
# ECS task definitions. No curl in a slim image: the venv's python does the GET.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: gunicorn (or celery) is PID 1 and gets docker's SIGTERM itself, so gunicorn
# finishes in-flight requests within graceful_timeout and celery finishes running tasks.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "service:create_app()"]
