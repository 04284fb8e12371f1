"""Every setting, declared once: its type, default, environment name and meaning.

The web, the workers, gunicorn.conf.py and the CLIs all read `Settings.from_env()`, and
.env.example is written from this class (`python -m devtools.env_example`), so the
documentation cannot drift from what the code reads. A bad value stops the process at start
with a `SettingsError` naming the variable, rather than failing later mid-request.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AliasGenerator, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUseDefault
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from common.ratelimit import RateLimit

# The sections of .env.example, in order; each field names the one it belongs to.
WHERE = "Where things are"
ENDPOINT = "The Firehose endpoint"
COOKIE_SYNC = "Cookie sync (GET /cookie-sync)"
REGISTRATION = "The module registration (what mParticle's review reads; README)"
DELIVERY = "Delivery to the partner"
BATCHING = "Batching towards the partner"
PUMP = "The inbox pump (in each worker)"
PROCESSES = "Processes"
METRICS = "Metrics (GET /metrics)"

_PARTNER_CLIENT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def setting(
    default: Any,
    description: str,
    *,
    group: str,
    env: str | None = None,
    secret: bool = False,
    commented: bool = False,
    **constraints: Any,
) -> Any:
    """One field: `env` only where the variable is not the upper-cased field name.

    `secret` keeps the value out of repr, public() and error messages, and empty in
    .env.example; `commented` writes it there as `# NAME=` (a default that is derived).
    """
    return Field(
        default,
        description=description,
        validation_alias=env,
        repr=not secret,
        json_schema_extra={"group": group, "secret": secret, "commented": commented},
        **constraints,
    )


class SettingsError(ValueError):
    """Bad settings, one line per variable; raised without pydantic's traceback attached."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings (see .env.example):\n" + "\n".join(f"  {p}" for p in problems))


# Set only while from_env() builds an instance: see settings_customise_sources.
_from_environment: ContextVar[bool] = ContextVar("firehose_settings_from_environment", default=False)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        # Every variable is the upper-cased field name unless the field gives `env`; the field
        # name is still accepted in code (Settings(redis_url=...)). Case-sensitive, so the only
        # other name the environment is searched for is the lower-case field name itself.
        alias_generator=AliasGenerator(validation_alias=str.upper),
        validate_by_name=True,
        validate_by_alias=True,
        case_sensitive=True,
        # Lists are comma-separated, not JSON (see _comma_list).
        enable_decoding=False,
        env_ignore_empty=True,
        # The defaults are written right here (and a test validates them); validating them on
        # every build would meet the empty broker_url default with "empty means the default".
        validate_default=False,
        allow_inf_nan=False,
        extra="forbid",
    )

    # --- Where things are ----------------------------------------------------------------
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "Redis: durable inbox, dedupe keys, dead letters and Celery's broker. rediss:// for TLS.\n"
        "`make up` starts a private redis-server when this is unset.",
        group=WHERE,
    )
    # Checked here because a typo must stop the process, not quietly change TLS.
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = setting(
        "required",
        "Certificate check for a rediss:// URL (REDIS_URL and CELERY_BROKER_URL) that carries no "
        "?ssl_cert_reqs= of its own: required | optional | none. Heroku Redis serves a self-signed "
        "certificate on a bare rediss:// URL: set none there. Ignored for redis://.",
        group=WHERE,
    )
    broker_url: str = setting(
        "",
        "Celery's broker, if it must differ from REDIS_URL.",
        group=WHERE,
        env="CELERY_BROKER_URL",
        commented=True,
    )
    # Sentinel: the primary is found, and followed after a failover, by name (common/redis_conn.py).
    redis_sentinels: tuple[str, ...] = setting(
        (),
        "Redis Sentinels as host:port, comma-separated. When set, the web, the workers, Celery's broker "
        "and the CLIs find the primary through them (by REDIS_SENTINEL_MASTER) and follow it after a "
        "failover; REDIS_URL then gives only the database number, password and TLS.",
        group=WHERE,
    )
    redis_sentinel_master: str = setting(
        "", "The primary's name in the Sentinels' configuration (with REDIS_SENTINELS).", group=WHERE
    )
    redis_sentinel_password: str = setting(
        "", "The Sentinels' own password, if they require one (with REDIS_SENTINELS).", group=WHERE, secret=True
    )
    partner_api_url: str = setting(
        "http://127.0.0.1:9400",
        "The partner API the workers deliver to (the reference contract in docs/partner-api.md).",
        group=WHERE,
    )
    port: int = setting(8000, "Web port (Heroku sets it).", group=WHERE, ge=1, le=65535)

    # --- The Firehose endpoint -------------------------------------------------------------
    # A comma-separated list lets an operator rotate the inbound token without downtime.
    auth_tokens: tuple[str, ...] = setting(
        (),
        "The token mParticle sends as `Authorization: Token <token>`. Comma-separate several to "
        "rotate without downtime. Required: without one the web refuses to start unless "
        "FIREHOSE_AUTH_DISABLED=true (registration never needs one).",
        group=ENDPOINT,
        env="FIREHOSE_AUTH_TOKEN",
        secret=True,
    )
    auth_disabled: bool = setting(
        False,
        "Run the Firehose endpoint open, with no token (local use only). Without FIREHOSE_AUTH_TOKEN the "
        "web refuses to start unless this is true; when it is, every start logs a warning.",
        group=ENDPOINT,
        env="FIREHOSE_AUTH_DISABLED",
    )
    max_body_bytes: int = setting(5 * 1024 * 1024, "Larger bodies are answered 413.", group=ENDPOINT, gt=0)
    unauthenticated_max_body_bytes: int = setting(
        64 * 1024,
        "Without a valid token only a (small) registration request is possible: larger bodies get 413.",
        group=ENDPOINT,
        gt=0,
    )
    body_read_timeout_seconds: float = setting(
        5.0,
        "Seconds each read of a request body may wait for the client; a stalled client gets 408, not a worker.",
        group=ENDPOINT,
        gt=0,
    )
    request_deadline_seconds: float = setting(
        10.0,
        "The whole request, headers and body, must arrive within this many seconds; a slower client is "
        "cut off (408) and holds no worker thread while it drips.",
        group=ENDPOINT,
        gt=0,
    )
    dedup_ttl_seconds: int = setting(
        86400,
        "A message id seen within this many seconds is answered 2xx again and not queued twice. "
        "An accepted event message's marks (seen and delivered) cost Redis about 48 bytes for this long: "
        "7.7 GiB at 2,000 messages/s for 24 h "
        '(README, "Sizing Redis"); shorten it at high rates.',
        group=ENDPOINT,
        gt=0,
    )
    ingest_redis_timeout_ms: int = setting(
        60,
        "The request path's Redis budget (the whole round trip must fit in mParticle's 100 ms); "
        "past it the answer is 503 + Retry-After (mParticle retries).",
        group=ENDPOINT,
        gt=0,
    )
    redis_min_replicas: int = setting(
        0,
        "When at least 1, a message is answered 2xx only after Redis's WAIT confirms that this many "
        "replicas hold it, within INGEST_REDIS_TIMEOUT_MS; otherwise 503 + Retry-After (mParticle retries).",
        group=ENDPOINT,
        ge=0,
    )
    redis_memory_high_watermark: float = setting(
        0.9,
        "Share of Redis's maxmemory above which the web answers 503 + Retry-After before writing "
        "(workers keep draining); /metrics shows it. Ignored when Redis has no maxmemory.",
        group=ENDPOINT,
        gt=0,
        le=1,
    )
    key_prefix: str = setting(
        "fr", "Prefix of every Redis key the service writes.", group=ENDPOINT, env="REDIS_KEY_PREFIX"
    )

    # --- Cookie sync ------------------------------------------------------------------------
    cookie_sync_allowed_hosts: tuple[str, ...] = setting(
        ("pixels.mparticle.com",),
        "Hosts the browser may be redirected back to, comma-separated; a leading dot allows subdomains. "
        "Anything else is refused with 400, so the endpoint is never an open redirect.",
        group=COOKIE_SYNC,
    )
    cookie_sync_macro: str = setting(
        "%%partner_id%%",
        "The placeholder in mParticle's redirect URL that receives the partner id (appended as "
        "partner_id=... when the URL has none).",
        group=COOKIE_SYNC,
    )
    cookie_sync_cookie: str = setting("fr_uid", "The partner's first-party id cookie.", group=COOKIE_SYNC)

    # --- The module registration ------------------------------------------------------------
    # The simple values of the registration response; the structured parts come from
    # service/module_registration.json and REGISTRATION_FILE (service/registration.py).
    # Commented in .env.example: `make up` sources .env with sh, which splits an unquoted value
    # with spaces. Quote them in .env.
    registration_name: str = setting(
        "Firehose Relay",
        "The integration's name in mParticle's directory: your company or product (quote it in .env).",
        group=REGISTRATION,
        commented=True,
    )
    registration_description: str = setting(
        "Streams your mParticle events, audiences and erasure requests to our API, durably and in order.",
        "The directory's description of the integration: fewer than 230 characters, inline HTML allowed "
        "(quote it in .env).",
        group=REGISTRATION,
        commented=True,
        max_length=229,
    )
    registration_version: str = setting(
        "1.0",
        "Your own version of the integration; raise it with each registration you send for review.",
        group=REGISTRATION,
    )
    registration_push_messaging_provider_id: str = setting(
        "",
        "The provider key in your push payloads. Unset: left out, and push_message_receipt is not offered "
        "(mParticle forwards only receipts that carry it).",
        group=REGISTRATION,
    )
    registration_max_data_age_hours: int = setting(
        24, "How old an event mParticle may still send, hours; -1 for any age.", group=REGISTRATION, ge=-1
    )
    registration_file: str = setting(
        "",
        "A JSON file laid over service/module_registration.json, section by section and key by key: "
        "permissions, identities, event types, account and audience settings (README). Checked at start.",
        group=REGISTRATION,
    )

    # --- Delivery to the partner ------------------------------------------------------------
    partner_client: str = setting(
        "workers.partner.reference:ReferencePartnerClient",
        "The partner client class, `package.module:Class`.",
        group=DELIVERY,
    )
    dlq_retention_seconds: int = setting(
        14 * 86400,
        "Dead letters are kept this long (default 14 days, as SQS's longest), then expire; `flask dlq list` "
        "shows when each one does.",
        group=DELIVERY,
        gt=0,
    )
    partner_timeout_seconds: float = setting(10.0, "Timeout of each partner call, seconds.", group=DELIVERY, gt=0)
    retry_max_attempts: int = setting(
        8, "Attempts before a transiently failing payload goes to the dead letters.", group=DELIVERY, ge=1
    )
    retry_backoff_base: float = setting(
        2.0,
        "Exponential backoff with full jitter: attempt n waits up to "
        "min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * 2^(n-1)) seconds.",
        group=DELIVERY,
        ge=0,
    )
    retry_backoff_max: float = setting(
        600.0, "The longest backoff between two attempts, seconds.", group=DELIVERY, ge=0
    )
    retry_max_age_seconds: int = setting(
        86400,
        "A message still failing this long after it was accepted goes to the dead letters "
        "(mParticle's own max_data_age_hours is 24).",
        group=DELIVERY,
        gt=0,
    )
    retry_after_max_seconds: float = setting(
        600.0,
        "A Retry-After (429, 503) is honoured up to this many seconds: a hostile or broken one must "
        "not park an API key for days.",
        group=DELIVERY,
        ge=0,
    )
    partner_rate_limit: str = setting(
        "50/second",
        "Calls per period per partner API key, across every worker: N/second, N/minute, N/hour "
        '(or N/Mseconds); "none" for no limit.',
        group=DELIVERY,
    )
    rate_limit_margin_ms: int = setting(
        50,
        "Added to the rate-limit period: a call decided at a window's edge reaches the partner a "
        "little later than another, and the partner counts by arrival.",
        group=DELIVERY,
        ge=0,
    )
    partner_max_in_flight_per_key: int = setting(
        4,
        "Partner calls to one API key in flight at once, across every worker: one customer's slow "
        "endpoint holds at most this many worker slots; more calls wait in the retry schedule.",
        group=DELIVERY,
        ge=1,
    )
    breaker_failure_threshold: int = setting(
        5,
        "Transient failures in a row (no answer, 408, 5xx; not 429) that open an API key's circuit "
        "breaker: its calls then wait in the retry schedule, without spending attempts, until a "
        "single probe call finds the endpoint answering again.",
        group=DELIVERY,
        ge=1,
    )
    breaker_cooldown_seconds: float = setting(
        5.0,
        "How long an opened breaker waits before its probe; doubles each time the probe fails.",
        group=DELIVERY,
        gt=0,
    )
    breaker_cooldown_max_seconds: float = setting(
        300.0, "The longest cool-down of an open breaker, seconds.", group=DELIVERY, gt=0
    )
    broker_visibility_timeout: int = setting(
        900,
        "Seconds before a task held by a dead worker is handed to another (Celery's "
        "visibility_timeout over Redis). Must outlast the longest delivery; retries never wait in "
        "a worker, so it does not bound the retry schedule.",
        group=DELIVERY,
        gt=0,
    )
    broker_restore_interval_seconds: int = setting(
        10, "How often each worker looks for such tasks, seconds.", group=DELIVERY, gt=0
    )

    # --- Batching towards the partner -------------------------------------------------------
    delivery_batch_max_messages: int = setting(
        50,
        "Event batches for the same API key share one POST /v1/events: at most this many messages "
        "a call (1 turns batching off).",
        group=BATCHING,
        ge=1,
    )
    delivery_batch_max_events: int = setting(1000, "At most this many events a call.", group=BATCHING, ge=1)
    delivery_batch_wait_ms: int = setting(
        20,
        "Under light traffic the pump waits this long for a call to fill (0: never waits).",
        group=BATCHING,
        ge=0,
    )

    # --- The inbox pump ---------------------------------------------------------------------
    pump_batch_size: int = setting(200, "Inbox entries the pump reads and hands to Celery at a time.", group=PUMP, ge=1)
    pump_block_ms: int = setting(
        500, "How long one read of the inbox waits for new entries, milliseconds.", group=PUMP, gt=0
    )
    pump_claim_idle_ms: int = setting(
        30000, "Entries a dead worker had read are taken over after this long, milliseconds.", group=PUMP, gt=0
    )
    pump_max_queued: int = setting(
        64,
        "The pump publishes while Celery's queue holds fewer tasks than this: the backlog waits in the "
        "per-API-key lanes, which take fair turns, not in Celery's one FIFO queue.",
        group=PUMP,
        ge=1,
    )

    # --- Processes --------------------------------------------------------------------------
    web_concurrency: int = setting(2, "gunicorn worker processes.", group=PROCESSES, ge=1)
    # Celery reads these through celery_config (workers/celery_app.py), so the worker command
    # lines (Procfile, compose, ECS, Procfile.dev) carry no pool flags of their own.
    worker_pool: Literal["threads", "prefork", "solo"] = setting(
        "threads",
        "Celery's pool in each worker: threads | prefork | solo. A delivery is mostly a wait on the "
        "partner's answer, so threads run many at once in one process (no fork, one Redis pool); "
        "a partner that hangs holds a thread, not a process.",
        group=PROCESSES,
    )
    worker_concurrency: int = setting(
        16,
        "Deliveries each worker process runs at once (threads, or pool processes under prefork).",
        group=PROCESSES,
        ge=1,
    )
    gunicorn_worker_class: str = setting(
        "service.gunicorn_worker.RelayWorker",
        "gunicorn's worker class. The default is gthread whose poller reads each whole request "
        "(within REQUEST_DEADLINE_SECONDS) before a thread sees it, so slow clients hold no thread, "
        "and which spreads connections over the worker processes (service/gunicorn_worker.py).",
        group=PROCESSES,
    )
    gunicorn_threads: int = setting(4, "Threads per gunicorn worker process.", group=PROCESSES, ge=1)
    gunicorn_keepalive: int = setting(
        75,
        "Seconds an idle keep-alive connection is held open: mParticle holds connections open "
        "between batches, and a keep-alive longer than its idle gap saves handshakes.",
        group=PROCESSES,
        ge=0,
    )
    gunicorn_timeout: int = setting(
        30, "A gunicorn worker silent this long, seconds, is killed and replaced.", group=PROCESSES, ge=0
    )
    gunicorn_graceful_timeout: int = setting(
        20, "On SIGTERM, seconds to finish in-flight requests before exiting.", group=PROCESSES, ge=0
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = setting(
        "info",
        "debug | info | warning | error | critical, for web and workers alike (it wins over celery's --loglevel).",
        group=PROCESSES,
    )
    log_format: Literal["json", "text"] = setting(
        "json",
        "json: one JSON object per line, for log search (the default). text: plain lines for a "
        "person at a terminal. Either way tokens, Authorization values and settings are redacted.",
        group=PROCESSES,
    )

    # --- Metrics ----------------------------------------------------------------------------
    metrics_redis_timeout_ms: int = setting(
        500,
        "How long a scrape waits for Redis (connect, then reply) before it reports firehose_redis_up 0.",
        group=METRICS,
        gt=0,
    )

    # ------------------------------------------------------------------------------ checks

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        # As before pydantic: surrounding spaces never count, and an empty value (an env file's
        # `NAME=`) means the default rather than "".
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise PydanticUseDefault()
        return value

    @field_validator("auth_tokens", "cookie_sync_allowed_hosts", "redis_sentinels", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            items = tuple(item.strip() for item in value.split(",") if item.strip())
            if not items:
                raise PydanticUseDefault()
            return items
        return value

    @field_validator("redis_ssl_cert_reqs", "log_level", "log_format", "worker_pool", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("partner_api_url")
    @classmethod
    def _partner_api_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("partner_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        try:
            RateLimit.parse(value)
        except ValueError as error:
            # The message names the variable for the workers' sake; the error line names it already.
            raise ValueError(str(error).removeprefix("PARTNER_RATE_LIMIT ")) from None
        return value

    @field_validator("partner_client")
    @classmethod
    def _partner_client(cls, value: str) -> str:
        if not _PARTNER_CLIENT.match(value):
            raise ValueError("must look like package.module:Class")
        return value

    @field_validator("registration_max_data_age_hours")
    @classmethod
    def _max_data_age(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (any age) or at least 1")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _sentinel_needs_master(self) -> Settings:
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError("REDIS_SENTINELS needs REDIS_SENTINEL_MASTER (the primary's name)")
        return self

    @model_validator(mode="after")
    def _broker_defaults_to_redis(self) -> Settings:
        if not self.broker_url:
            # Frozen: the one derived default is filled in while the instance is being built.
            object.__setattr__(self, "broker_url", self.redis_url)
        return self

    # --------------------------------------------------------------------------- building

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(_problems(error)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings(...) in code (tests, tools) is exactly what it says: only from_env() reads
        # the environment, so a developer's shell cannot change what a test runs with. No .env
        # file is read either: `make up` and docker compose load it into the environment.
        if _from_environment.get():
            return (init_settings, _Environment(settings_cls))
        return (init_settings,)

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment; SettingsError names every bad variable."""
        token = _from_environment.set(True)
        try:
            return cls()
        finally:
            _from_environment.reset(token)

    @classmethod
    def env_name(cls, field_name: str) -> str:
        """The environment variable that sets `field_name`."""
        alias = cls.model_fields[field_name].validation_alias
        return alias if isinstance(alias, str) else field_name.upper()

    def public(self) -> dict[str, object]:
        """The settings without secrets, for a startup log line."""
        out: dict[str, object] = {name: getattr(self, name) for name, f in type(self).model_fields.items() if f.repr}
        out["auth_tokens"] = len(self.auth_tokens)
        out["redis_sentinel_password"] = "***" if self.redis_sentinel_password else ""
        return out


class _Environment(EnvSettingsSource):
    """The environment, each field read under its one documented name.

    The stock source would also read the lower-case field name (`broker_url`), because code
    may pass field names (validate_by_name): an undocumented second name for every setting.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        env = Settings.env_name(field_name)
        return self.env_vars.get(env), env, False


def _problems(error: ValidationError) -> list[str]:
    names = {name: Settings.env_name(name) for name in Settings.model_fields}
    by_env = {env: name for name, env in names.items()}
    problems: dict[str, str] = {}
    for item in error.errors(include_url=False):
        key = str(item["loc"][0]) if item["loc"] else ""
        field = key if key in names else by_env.get(key)
        env = names[field] if field else key
        if env in problems:
            continue  # one line per variable: the first reason is enough to fix it
        message = item["msg"].removeprefix("Value error, ")
        secret = field is not None and not Settings.model_fields[field].repr
        shown = "" if secret or item["type"] == "extra_forbidden" else f"={item['input']!r}"
        problems[env] = f"{env}{shown}: {message}"
    return list(problems.values())


@dataclass(frozen=True)
class OtherVariable:
    """A variable .env.example documents that is not a setting of ours."""

    name: str
    description: str
    group: str
    example: str = ""


# Read by something other than Settings, so not fields, but worth a line in .env.example.
OTHER_VARIABLES = (
    OtherVariable(
        "REMAP_SIGTERM",
        "Heroku only (set in app.json): SIGTERM goes to every process of a dyno; as SIGQUIT, Celery "
        "gives running deliveries 20 s to finish before their tasks go back to the queue.",
        PROCESSES,
        example="SIGQUIT",
    ),
    # docker-compose.yml reads these two; nothing in Python does.
    OtherVariable(
        "FLOWER_BASIC_AUTH",
        "docker compose only: the login to Flower, user:password (required: compose refuses to start "
        "without it, so the queues and task summaries are never open).",
        PROCESSES,
    ),
    OtherVariable(
        "GRAFANA_ADMIN_PASSWORD",
        "docker compose --profile monitoring only: Grafana's admin password (default admin; Grafana is "
        "published on 127.0.0.1 only).",
        METRICS,
    ),
    # Process plumbing: gunicorn.conf.py sets it for its workers (prometheus_client reads it
    # from the environment at import), so it must stay an environment variable.
    OtherVariable(
        "PROMETHEUS_MULTIPROC_DIR",
        "Where gunicorn's worker processes keep their metric files so a scrape sums them all "
        "(prometheus_client multi-process mode). Unset: a private temporary directory per server, "
        "removed when it exits. If you set it: for the web only, one directory per server; its "
        "*.db files are deleted when the server starts.",
        METRICS,
    ),
)
