"""Fault rules: configurable misbehaviour so the relay's retry paths can be exercised."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

_RULE_KEYS = frozenset(
    {
        "path_prefix",
        "method",
        "status",
        "times",
        "probability",
        "seed",
        "retry_after",
        "latency_ms",
        "api_key_sha256",
    }
)


class FaultConfigError(ValueError):
    """A fault rule or rule set is malformed."""


@dataclass
class FaultRule:
    path_prefix: str = "/v1"
    method: str | None = None
    status: int | None = 503
    times: int | None = None
    probability: float = 1.0
    seed: int | str | None = None
    retry_after: str | None = None
    latency_ms: int = 0
    api_key_sha256: str | None = None
    remaining: int | None = None
    fired: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def matches(self, method: str, path: str, api_key_sha256: str | None) -> bool:
        if self.remaining == 0:
            return False
        if not path.startswith(self.path_prefix):
            return False
        if self.method is not None and self.method != method:
            return False
        return self.api_key_sha256 is None or self.api_key_sha256 == api_key_sha256

    def try_fire(self) -> bool:
        """Roll the dice; on a hit, consume one of the rule's remaining uses.

        `times` counts firings, not matches: a probabilistic rule with times=3
        produces exactly three faults before it expires.
        """
        # Skip the RNG for certain rules so adding one does not shift the
        # sequence a seeded probabilistic rule would otherwise produce.
        if self.probability < 1.0 and self.rng.random() >= self.probability:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        self.fired += 1
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "path_prefix": self.path_prefix,
            "method": self.method,
            "status": self.status,
            "times": self.times,
            "probability": self.probability,
            "seed": self.seed,
            "retry_after": self.retry_after,
            "latency_ms": self.latency_ms,
            "api_key_sha256": self.api_key_sha256,
            "remaining": self.remaining,
            "fired": self.fired,
            "expired": self.remaining == 0,
        }


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `"times": true` is a typo, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def parse_rule(raw: Any) -> FaultRule:
    if not isinstance(raw, dict):
        raise FaultConfigError("a fault rule must be a JSON object")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        # Reject typos ("retry-after", "time") instead of silently ignoring them.
        raise FaultConfigError(f"unknown fault rule keys: {sorted(unknown)}")

    path_prefix = raw.get("path_prefix", "/v1")
    if not isinstance(path_prefix, str) or not path_prefix.startswith("/"):
        raise FaultConfigError("path_prefix must be a string starting with '/'")

    method = raw.get("method")
    if method is not None:
        if not isinstance(method, str) or not method:
            raise FaultConfigError("method must be a non-empty string or null")
        method = method.upper()

    status = raw.get("status", 503)
    if status is not None and (not _is_int(status) or not 100 <= status <= 599):
        raise FaultConfigError("status must be an HTTP status code (100-599) or null")

    times = raw.get("times")
    if times is not None and (not _is_int(times) or times < 0):
        raise FaultConfigError("times must be a non-negative integer or null")

    probability = raw.get("probability", 1.0)
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0.0 <= probability <= 1.0:
        raise FaultConfigError("probability must be a number between 0 and 1")

    seed = raw.get("seed")
    if seed is not None and not (_is_int(seed) or isinstance(seed, str)):
        raise FaultConfigError("seed must be an integer, a string or null")

    retry_after = raw.get("retry_after")
    if retry_after is not None:
        if _is_int(retry_after):
            retry_after = str(retry_after)
        elif not isinstance(retry_after, str) or not retry_after:
            raise FaultConfigError("retry_after must be a non-empty string, an integer or null")

    latency_ms = raw.get("latency_ms", 0)
    if latency_ms is None:
        latency_ms = 0
    if not _is_int(latency_ms) or latency_ms < 0:
        raise FaultConfigError("latency_ms must be a non-negative integer")

    api_key_sha256 = raw.get("api_key_sha256")
    if api_key_sha256 is not None:
        if not isinstance(api_key_sha256, str) or not api_key_sha256:
            raise FaultConfigError("api_key_sha256 must be a non-empty string or null")
        api_key_sha256 = api_key_sha256.lower()

    return FaultRule(
        path_prefix=path_prefix,
        method=method,
        status=status,
        times=times,
        probability=float(probability),
        seed=seed,
        retry_after=retry_after,
        latency_ms=latency_ms,
        api_key_sha256=api_key_sha256,
        remaining=times,
        rng=random.Random(seed) if seed is not None else random.Random(),
    )


def parse_rules(raw: Any) -> list[FaultRule]:
    """Parse `{"rules": [...]}`, the shape of POST /_stub/faults, --faults and STUB_FAULTS."""
    if raw is None:
        return []
    if not isinstance(raw, dict) or not isinstance(raw.get("rules"), list):
        raise FaultConfigError('faults must be a JSON object of the form {"rules": [...]}')
    unknown = set(raw) - {"rules"}
    if unknown:
        raise FaultConfigError(f"unknown keys in fault configuration: {sorted(unknown)}")
    rules = []
    for index, item in enumerate(raw["rules"]):
        try:
            rules.append(parse_rule(item))
        except FaultConfigError as exc:
            raise FaultConfigError(f"rules[{index}]: {exc}") from None
    return rules
