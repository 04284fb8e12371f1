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
# The web refuses to start without a token. No fixed default (a well-known one opens every
# dev stack to anyone who reads this file): a fresh random one per run unless .env or the shell
# sets one, or FIREHOSE_AUTH_DISABLED=true runs it open. The banner shows which.
# The first token of the comma-separated list is the one the banner's sample uses.
token=""
IFS=, read -ra tokens <<<"${FIREHOSE_AUTH_TOKEN:-}"
for each in "${tokens[@]}"; do
  each="${each// /}"
  if [ -n "$each" ]; then token="$each" && break; fi
done
token_source="from your environment"
opt_out="${FIREHOSE_AUTH_DISABLED:-}"
if [ -z "$token" ] && [[ ! "${opt_out,,}" =~ ^(true|1|yes|on)$ ]]; then
  token="$(python -c 'import secrets; print(secrets.token_urlsafe(24))')"
  FIREHOSE_AUTH_TOKEN="$token"
  token_source="generated for this run; set FIREHOSE_AUTH_TOKEN in .env to keep one"
fi
export FIREHOSE_AUTH_TOKEN="${FIREHOSE_AUTH_TOKEN:-}"
export WEB_CONCURRENCY="${WEB_CONCURRENCY:-2}"
processes="stub web worker"
if [ -z "${REDIS_URL:-}" ]; then
  command -v redis-server >/dev/null || { echo "No REDIS_URL set and no redis-server installed." >&2; exit 1; }
  export DEV_REDIS_PORT="${DEV_REDIS_PORT:-6390}"
  export REDIS_URL="redis://127.0.0.1:$DEV_REDIS_PORT/0"
  processes="redis $processes"
fi
if [ -n "$token" ]; then
  auth_line="Token ($token_source): $token"
  header="-H 'Authorization: Token $token' "
else
  auth_line="FIREHOSE_AUTH_DISABLED=true: the endpoint takes messages without a token (loopback only)"
  header=""
fi
cat <<MSG
Firehose Relay: web on http://127.0.0.1:$PORT (this host only), partner stub on $PARTNER_API_URL, Redis at $REDIS_URL
$auth_line
Send it a sample from another terminal:
  curl -s -X POST http://127.0.0.1:$PORT/firehose ${header}--data-binary @examples/event_batch.json
and see what the partner received:
  curl -s $PARTNER_API_URL/_stub/state
MSG
# shellcheck disable=SC2086 # one word per process name
exec honcho -f Procfile.dev start $processes
