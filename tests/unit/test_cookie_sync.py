"""GET /cookie-sync: the partner id goes back to mParticle, and never to anyone else."""

from __future__ import annotations

from urllib.parse import parse_qs, quote, urlsplit

import pytest
from flask.testing import FlaskClient

from common.config import Settings
from service import create_app

MPARTICLE = "https://pixels.mparticle.com/v1/sync?esid=1234&mpid=8675309&pid=%%partner_id%%"


@pytest.fixture
def client(redis_url: str) -> FlaskClient:
    settings = Settings(redis_url=redis_url, broker_url=redis_url)
    return create_app(settings).test_client()


def sync(client: FlaskClient, target: str, **params: str):
    query = "&".join([f"redirect={quote(target, safe='')}", *(f"{k}={quote(v)}" for k, v in params.items())])
    return client.get(f"/cookie-sync?{query}")


def test_new_browser_gets_an_id_cookie_and_is_sent_back(client: FlaskClient) -> None:
    response = sync(client, MPARTICLE, gdpr="1", gdpr_consent="abc")
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert location.hostname == "pixels.mparticle.com"
    query = parse_qs(location.query)
    cookie = response.headers["Set-Cookie"]
    partner_id = cookie.split(";")[0].split("=", 1)[1]
    assert query["pid"] == [partner_id] and query["esid"] == ["1234"] and query["mpid"] == ["8675309"]
    assert query["gdpr"] == ["1"] and query["gdpr_consent"] == ["abc"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=None" in cookie
    assert response.headers["Cache-Control"] == "no-store"


def test_known_browser_keeps_its_id(client: FlaskClient) -> None:
    client.set_cookie("fr_uid", "known-partner-id-42", domain="localhost")
    response = sync(client, MPARTICLE)
    assert response.status_code == 302
    assert parse_qs(urlsplit(response.headers["Location"]).query)["pid"] == ["known-partner-id-42"]
    assert "Set-Cookie" not in response.headers


def test_tampered_cookie_is_replaced(client: FlaskClient) -> None:
    client.set_cookie("fr_uid", "<script>", domain="localhost")
    response = sync(client, MPARTICLE)
    assert "<script>" not in response.headers["Location"] and "Set-Cookie" in response.headers


def test_redirect_without_macro_gets_the_id_appended(client: FlaskClient) -> None:
    response = sync(client, "https://pixels.mparticle.com/v1/sync?esid=1")
    assert "partner_id" in parse_qs(urlsplit(response.headers["Location"]).query)


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/steal",
        "https://pixels.mparticle.com.evil.example/x",
        "https://evilpixels.mparticle.com/x",
        "https://user@pixels.mparticle.com/x",
        "https://evil.example\\@pixels.mparticle.com/x",
        "https://evil.example\\.pixels.mparticle.com/x",
        "//evil.example/x",
        "/relative/path",
        "http://pixels.mparticle.com/x",
        "javascript:alert(1)//pixels.mparticle.com",
        "https://pixels.mparticle.com\r\nSet-Cookie: x=y",
        "",
    ],
)
def test_open_redirect_attempts_are_refused(client: FlaskClient, target: str) -> None:
    response = sync(client, target)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] in {"invalid_redirect", "redirect_not_allowed"}
    assert "Location" not in response.headers


def test_missing_redirect_is_400(client: FlaskClient) -> None:
    response = client.get("/cookie-sync")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_redirect"


def test_subdomains_only_when_configured(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, broker_url=redis_url)
    eu = "https://pixels.eu1.mparticle.com/v1/sync?pid=%%partner_id%%"
    strict = create_app(settings).test_client()
    assert sync(strict, eu).status_code == 400
    wide = create_app(settings.model_copy(update={"cookie_sync_allowed_hosts": (".mparticle.com",)})).test_client()
    assert sync(wide, eu).status_code == 302
    assert sync(wide, "https://mparticle.com.evil.example/").status_code == 400
