"""Settings (common/config.py): names, defaults, parsing, the start-up check, and who reads them."""

from __future__ import annotations

import logging
import re
import runpy
import ssl
from typing import Any

import pytest

from common.config import OTHER_VARIABLES, Settings, SettingsError
from common.logging_setup import configure_logging, log_format, log_level
from common.ratelimit import RateLimit
from common.redis_conn import ingest_client, tls_options, worker_client
from devtools import env_example
from service import create_app
from tests.support import ROOT

ENV_NAMES = [Settings.env_name(name) for name in Settings.model_fields]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting from the shell running the tests: each test sets what it reads."""
    for name in [*ENV_NAMES, *(name.lower() for name in Settings.model_fields)]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _defaults() -> dict[str, Any]:
    return {name: field.default for name, field in Settings.model_fields.items()}


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.broker_url == settings.redis_url  # CELERY_BROKER_URL defaults to REDIS_URL
    assert settings.redis_ssl_cert_reqs == "required"
    assert settings.auth_tokens == ()
    assert settings.partner_rate_limit == "50/second"
    assert settings.cookie_sync_allowed_hosts == ("pixels.mparticle.com",)
    assert settings.partner_client == "workers.partner.reference:ReferencePartnerClient"
    assert (settings.port, settings.web_concurrency, settings.gunicorn_worker_class) == (
        8000,
        2,
        "service.gunicorn_worker.RelayWorker",
    )
    assert (settings.gunicorn_threads, settings.gunicorn_keepalive) == (4, 75)
    assert (settings.gunicorn_timeout, settings.gunicorn_graceful_timeout) == (30, 20)
    assert (settings.log_level, settings.log_format, settings.metrics_redis_timeout_ms) == ("info", "json", 500)
    # An empty environment means the same thing.
    assert Settings.from_env() == settings


def test_every_default_passes_the_checks() -> None:
    # Defaults are not validated on each build (validate_default=False): check them once here.
    assert Settings(**_defaults()) == Settings()


def test_every_field_is_documented_and_has_one_variable() -> None:
    assert len(set(ENV_NAMES)) == len(ENV_NAMES)
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert Settings.env_name(name).isupper(), name
        assert isinstance(field.json_schema_extra, dict) and field.json_schema_extra["group"], name


def test_settings_built_in_code_ignore_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REDIS_KEY_PREFIX", "from-env")
    clean_env.setenv("MAX_BODY_BYTES", "oops")
    assert Settings().key_prefix == "fr"
    assert Settings(key_prefix="code").key_prefix == "code"


def test_frozen() -> None:
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.redis_url = "redis://elsewhere:6379/0"  # type: ignore[misc]


# ---------------------------------------------------------------- environment names


@pytest.mark.parametrize(
    ("variable", "raw", "field", "value"),
    [
        ("REDIS_URL", "redis://example:6379/3", "redis_url", "redis://example:6379/3"),
        ("CELERY_BROKER_URL", "redis://broker:6379/1", "broker_url", "redis://broker:6379/1"),
        ("FIREHOSE_AUTH_TOKEN", "abc", "auth_tokens", ("abc",)),
        ("REDIS_KEY_PREFIX", "pfx", "key_prefix", "pfx"),
        ("REDIS_SSL_CERT_REQS", " None ", "redis_ssl_cert_reqs", "none"),
        ("PARTNER_API_URL", "https://api.partner.example/", "partner_api_url", "https://api.partner.example"),
        ("PARTNER_RATE_LIMIT", "600/minute", "partner_rate_limit", "600/minute"),
        ("PARTNER_CLIENT", "acme.client:AcmeClient", "partner_client", "acme.client:AcmeClient"),
        ("MAX_BODY_BYTES", " 1000 ", "max_body_bytes", 1000),
        ("BODY_READ_TIMEOUT_SECONDS", "2.5", "body_read_timeout_seconds", 2.5),
        ("PORT", "9000", "port", 9000),
        ("WEB_CONCURRENCY", "3", "web_concurrency", 3),
        ("GUNICORN_WORKER_CLASS", "sync", "gunicorn_worker_class", "sync"),
        ("GUNICORN_THREADS", "8", "gunicorn_threads", 8),
        ("GUNICORN_KEEPALIVE", "5", "gunicorn_keepalive", 5),
        ("GUNICORN_TIMEOUT", "10", "gunicorn_timeout", 10),
        ("GUNICORN_GRACEFUL_TIMEOUT", "7", "gunicorn_graceful_timeout", 7),
        ("LOG_LEVEL", "DEBUG", "log_level", "debug"),
        ("LOG_FORMAT", "Text", "log_format", "text"),
        ("METRICS_REDIS_TIMEOUT_MS", "200", "metrics_redis_timeout_ms", 200),
    ],
)
def test_environment_names(clean_env: pytest.MonkeyPatch, variable: str, raw: str, field: str, value: object) -> None:
    assert Settings.env_name(field) == variable
    clean_env.setenv(variable, raw)
    assert getattr(Settings.from_env(), field) == value


def test_only_the_documented_name_is_read(clean_env: pytest.MonkeyPatch) -> None:
    # The field name is accepted in code, never as a second environment name.
    clean_env.setenv("broker_url", "redis://not-this:6379/0")
    clean_env.setenv("KEY_PREFIX", "not-this")
    clean_env.setenv("AUTH_TOKENS", "not-this")
    settings = Settings.from_env()
    assert settings.broker_url == settings.redis_url
    assert settings.key_prefix == "fr"
    assert settings.auth_tokens == ()


def test_broker_follows_redis_url(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REDIS_URL", "redis://example:6379/3")
    assert Settings.from_env().broker_url == "redis://example:6379/3"
    assert Settings(redis_url="redis://code:6379/0").broker_url == "redis://code:6379/0"


def test_comma_lists(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FIREHOSE_AUTH_TOKEN", " one, two ,,")
    clean_env.setenv("COOKIE_SYNC_ALLOWED_HOSTS", "pixels.mparticle.com, .example.com")
    settings = Settings.from_env()
    assert settings.auth_tokens == ("one", "two")
    assert settings.cookie_sync_allowed_hosts == ("pixels.mparticle.com", ".example.com")
    # Only separators: as if unset.
    clean_env.setenv("COOKIE_SYNC_ALLOWED_HOSTS", " , ,")
    assert Settings.from_env().cookie_sync_allowed_hosts == ("pixels.mparticle.com",)
    # A list given in code stays as it is.
    assert Settings(auth_tokens=["a", "b"]).auth_tokens == ("a", "b")


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_means_default(clean_env: pytest.MonkeyPatch, empty: str) -> None:
    for name in ENV_NAMES:
        clean_env.setenv(name, empty)
    assert Settings.from_env() == Settings()


# ------------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    ("variable", "raw", "reason"),
    [
        ("PARTNER_RATE_LIMIT", "fast", "must look like '50/second'"),
        ("PARTNER_RATE_LIMIT", "0/second", "at least 1 call"),
        ("REDIS_SSL_CERT_REQS", "maybe", "'required', 'optional' or 'none'"),
        ("REDIS_SSL_CERT_REQS", "off", "'required', 'optional' or 'none'"),
        ("PARTNER_TIMEOUT_SECONDS", "-1", "greater than 0"),
        ("INGEST_REDIS_TIMEOUT_MS", "0", "greater than 0"),
        ("GUNICORN_TIMEOUT", "-5", "greater than or equal to 0"),
        ("RETRY_MAX_ATTEMPTS", "0", "greater than or equal to 1"),
        ("MAX_BODY_BYTES", "1.5", "valid integer"),
        ("WEB_CONCURRENCY", "two", "valid integer"),
        ("PORT", "70000", "less than or equal to 65535"),
        ("BODY_READ_TIMEOUT_SECONDS", "nan", "finite number"),
        ("RETRY_BACKOFF_MAX", "soon", "valid number"),
        ("LOG_LEVEL", "verbose", "'debug', 'info'"),
        ("LOG_FORMAT", "xml", "'json' or 'text'"),
        ("REDIS_URL", "localhost:6379", "redis://"),
        ("PARTNER_API_URL", "api.partner.example", "http://"),
        ("PARTNER_CLIENT", "acme.AcmeClient", "package.module:Class"),
    ],
)
def test_a_bad_value_names_its_variable(clean_env: pytest.MonkeyPatch, variable: str, raw: str, reason: str) -> None:
    clean_env.setenv(variable, raw)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env()
    error = caught.value
    assert error.problems == [f"{variable}={raw!r}: {error.problems[0].split(': ', 1)[1]}"]
    assert reason in str(error)
    # Nothing of pydantic's around it: no chained traceback, no URL to its docs.
    assert error.__cause__ is None and error.__suppress_context__
    assert "pydantic" not in str(error)
    assert isinstance(error, ValueError)


def test_every_bad_variable_gets_one_line(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PARTNER_RATE_LIMIT", "fast")
    clean_env.setenv("REDIS_SSL_CERT_REQS", "maybe")
    clean_env.setenv("DEDUP_TTL_SECONDS", "-1")
    clean_env.setenv("MAX_BODY_BYTES", "5")  # fine
    with pytest.raises(SettingsError) as caught:
        Settings.from_env()
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid settings (see .env.example):"
    assert sorted(line.split("=")[0].strip() for line in lines[1:]) == [
        "DEDUP_TTL_SECONDS",
        "PARTNER_RATE_LIMIT",
        "REDIS_SSL_CERT_REQS",
    ]


def test_bad_values_in_code_and_unknown_names_are_errors_too() -> None:
    with pytest.raises(SettingsError, match="MAX_BODY_BYTES=-3"):
        Settings(max_body_bytes=-3)
    with pytest.raises(SettingsError, match="max_body_byte: Extra inputs are not permitted"):
        Settings(max_body_byte=10)


def test_a_secret_is_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(auth_tokens=[{"not": "a token"}])
    assert caught.value.problems == ["FIREHOSE_AUTH_TOKEN: Input should be a valid string"]


# ------------------------------------------------------------------------- public()


def test_public_hides_tokens(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FIREHOSE_AUTH_TOKEN", "s3cret-token-1,s3cret-token-2")
    settings = Settings.from_env()
    public = settings.public()
    assert public["auth_tokens"] == 2
    assert "s3cret" not in repr(settings) and "s3cret" not in str(public)
    assert set(public) == set(Settings.model_fields)
    assert public["redis_url"] == settings.redis_url


# ----------------------------------------------------------------- the rate limit


def test_rate_limit_parsing_lives_in_common_and_workers_reexport_it() -> None:
    from workers.ratelimit import RateLimit as WorkersRateLimit

    assert WorkersRateLimit is RateLimit
    assert RateLimit.parse("50/second") == RateLimit(50, 1)
    assert RateLimit.parse("600/minute") == RateLimit(600, 60)
    assert RateLimit.parse("5/2seconds") == RateLimit(5, 2)
    assert RateLimit.parse("none") is None
    with pytest.raises(ValueError, match="PARTNER_RATE_LIMIT"):
        RateLimit.parse("fast")


# ------------------------------------------------------------- REDIS_SSL_CERT_REQS


def test_settings_read_redis_ssl_cert_reqs(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings.from_env().redis_ssl_cert_reqs == "required"
    clean_env.setenv("REDIS_SSL_CERT_REQS", " None ")
    assert Settings.from_env().redis_ssl_cert_reqs == "none"
    clean_env.setenv("REDIS_SSL_CERT_REQS", "off")
    with pytest.raises(SettingsError, match="REDIS_SSL_CERT_REQS"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("url", "setting", "expected"),
    [
        ("redis://h:6379/0", "none", None),  # plain TCP: no TLS options at all
        ("rediss://h:6379/0", None, ssl.CERT_REQUIRED),  # no setting given: verify
        ("rediss://h:6379/0", "required", ssl.CERT_REQUIRED),
        ("rediss://h:6379/0", "none", ssl.CERT_NONE),  # Heroku: bare URL, self-signed
        ("rediss://h:6379/0", "optional", ssl.CERT_OPTIONAL),
        ("rediss://h:6379/0?ssl_cert_reqs=required", "none", ssl.CERT_REQUIRED),  # the URL wins
        ("rediss://h:6379/0?ssl_cert_reqs=CERT_NONE", "required", ssl.CERT_NONE),
        ("rediss://h:6379/0?ssl_cert_reqs=bogus", "none", ssl.CERT_REQUIRED),  # unknown: verify
    ],
)
def test_tls_options(clean_env: pytest.MonkeyPatch, url: str, setting: str | None, expected: int | None) -> None:
    # The environment plays no part: callers pass the setting.
    clean_env.setenv("REDIS_SSL_CERT_REQS", "none")
    assert tls_options(url, setting) == ({} if expected is None else {"ssl_cert_reqs": expected})


def test_redis_clients_and_celery_broker_get_the_setting() -> None:
    from workers.celery_app import celery_config
    from workers.pump import InboxPump
    from workers.runtime import build_runtime

    url = "rediss://:secret@redis.example:6380/0"
    for client in (ingest_client(url, 60, "none"), worker_client(url, ssl_cert_reqs="none")):
        assert client.connection_pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_NONE
    settings = Settings(redis_url=url, redis_ssl_cert_reqs="none")
    assert celery_config(settings)["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert celery_config(Settings(broker_url="redis://h:6379/0"))["broker_use_ssl"] is None

    # Every client the web and the workers build from Settings (none of them connects here).
    app = create_app(Settings(redis_url=url, broker_url=url.replace("/0", "/1"), redis_ssl_cert_reqs="none"))
    scrape = app.extensions["metrics_scrape"].collectors[-1]
    clients = [app.extensions["ingest"].client, scrape.client, scrape.broker]
    clients.append(build_runtime(settings, partner=object()).redis)  # type: ignore[arg-type]
    clients.append(InboxPump(None, settings, "test").redis)  # type: ignore[arg-type]
    for client in clients:
        assert client.connection_pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_NONE


# --------------------------------------------------------------------------- logging


def test_logging_takes_level_and_format_from_settings_or_arguments(clean_env: pytest.MonkeyPatch) -> None:
    assert log_format() == "json" and log_level() == logging.INFO
    clean_env.setenv("LOG_FORMAT", "text")
    clean_env.setenv("LOG_LEVEL", "warning")
    assert log_format() == "text" and log_level() == logging.WARNING
    assert log_format(Settings()) == "json" and log_level(settings=Settings(log_level="debug")) == logging.DEBUG
    assert log_level("ERROR") == logging.ERROR and log_level(10) == logging.DEBUG
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("test", None, (), "json")
    try:
        assert root.level == logging.WARNING  # LOG_LEVEL, through Settings
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# --------------------------------------------------------------------- gunicorn.conf.py


def _gunicorn_conf() -> dict[str, Any]:
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_gunicorn_conf_reads_settings(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FIREHOSE_AUTH_TOKEN", "conf-token")  # without one (or the opt-out) it stops
    conf = _gunicorn_conf()
    defaults = Settings()
    assert conf["bind"] == "0.0.0.0:8000"
    assert conf["workers"] == defaults.web_concurrency
    assert conf["worker_class"] == "service.gunicorn_worker.RelayWorker" and conf["threads"] == 4
    assert (conf["keepalive"], conf["timeout"], conf["graceful_timeout"]) == (75, 30, 20)
    assert conf["loglevel"] == "info"

    values = {
        "PORT": "9123",
        "WEB_CONCURRENCY": "5",
        "GUNICORN_WORKER_CLASS": "sync",
        "GUNICORN_THREADS": "2",
        "GUNICORN_KEEPALIVE": "3",
        "GUNICORN_TIMEOUT": "11",
        "GUNICORN_GRACEFUL_TIMEOUT": "9",
        "LOG_LEVEL": "WARNING",
    }
    for name, value in values.items():
        clean_env.setenv(name, value)
    conf = _gunicorn_conf()
    assert conf["bind"] == "0.0.0.0:9123"
    assert (conf["workers"], conf["worker_class"], conf["threads"]) == (5, "sync", 2)
    assert (conf["keepalive"], conf["timeout"], conf["graceful_timeout"]) == (3, 11, 9)
    assert conf["loglevel"] == "warning"


def test_gunicorn_conf_stops_on_a_bad_setting_with_the_message(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GUNICORN_TIMEOUT", "-1")
    clean_env.setenv("PARTNER_RATE_LIMIT", "fast")
    with pytest.raises(SystemExit) as caught:
        _gunicorn_conf()
    message = str(caught.value.code)
    assert "GUNICORN_TIMEOUT='-1'" in message and "PARTNER_RATE_LIMIT='fast'" in message


# ----------------------------------------------------------------------- .env.example


def test_env_example_is_what_the_generator_writes() -> None:
    assert (ROOT / ".env.example").read_text() == env_example.render(), (
        ".env.example is out of date: run `python -m devtools.env_example`"
    )


def test_env_example_lists_every_setting_with_its_default() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    found = [re.fullmatch(r"(# )?([A-Z][A-Z0-9_]*)=(.*)", line) for line in lines]
    examples = {m[2]: m[3] for m in found if m}
    commented = {m[2] for m in found if m and m[1]}
    assert set(ENV_NAMES) <= set(examples)
    assert examples["FIREHOSE_AUTH_TOKEN"] == "" and "FIREHOSE_AUTH_TOKEN" not in commented  # a secret: no example
    assert examples["CELERY_BROKER_URL"] == "" and "CELERY_BROKER_URL" in commented  # derived from REDIS_URL
    assert examples["COOKIE_SYNC_ALLOWED_HOSTS"] == "pixels.mparticle.com"
    assert examples["BODY_READ_TIMEOUT_SECONDS"] == "5"
    for other in OTHER_VARIABLES:
        assert other.name not in ENV_NAMES and examples[other.name] == other.example and other.name in commented
    # What the example says is what the settings read.
    assert Settings(**{name: examples[Settings.env_name(name)] for name in Settings.model_fields}) == Settings()
