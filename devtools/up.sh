#!/usr/bin/env bash
# Brings up the whole stack on this machine: Redis (yours via REDIS_URL, or a private one),
# the partner stub, the web and a worker. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .env ] && set -a && . ./.env && set +a

export PORT="${PORT:-8000}" WEB_PORT="${PORT:-8000}"
export PATH="$PWD/.venv/bin:$PATH"
export STUB_PORT="${STUB_PORT:-9400}"
export PARTNER_API_URL="${PARTNER_API_URL:-http://127.0.0.1:$STUB_PORT}"
export FIREHOSE_AUTH_TOKEN="${FIREHOSE_AUTH_TOKEN:-dev-token}"
export WEB_CONCURRENCY="${WEB_CONCURRENCY:-2}"
processes="stub web worker"
if [ -z "${REDIS_URL:-}" ]; then
  command -v redis-server >/dev/null || { echo "No REDIS_URL set and no redis-server installed." >&2; exit 1; }
  export DEV_REDIS_PORT="${DEV_REDIS_PORT:-6390}"
  export REDIS_URL="redis://127.0.0.1:$DEV_REDIS_PORT/0"
  processes="redis $processes"
fi
token="${FIREHOSE_AUTH_TOKEN%%,*}"
cat <<MSG
Firehose Relay: web on http://127.0.0.1:$PORT, partner stub on $PARTNER_API_URL, Redis at $REDIS_URL
Send it a sample from another terminal:
  curl -s -X POST http://127.0.0.1:$PORT/firehose -H 'Authorization: Token $token' --data-binary @examples/event_batch.json
and see what the partner received:
  curl -s $PARTNER_API_URL/_stub/state
MSG
# shellcheck disable=SC2086 # one word per process name
exec honcho -f Procfile.dev start $processes
