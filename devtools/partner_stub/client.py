"""The stub's admin routes as tests and benchmarks use them."""

from __future__ import annotations

from typing import Any

import requests


class Stub:
    """The partner stub as the tests see it: its URL and its admin routes."""

    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self) -> None:
        requests.post(f"{self.url}/_stub/reset", timeout=5).raise_for_status()

    def faults(self, rules: list[dict[str, Any]]) -> None:
        requests.post(f"{self.url}/_stub/faults", json={"rules": rules}, timeout=5).raise_for_status()

    def state(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/_stub/state", timeout=5).json()

    def requests(self, path_prefix: str = "/v1") -> list[dict[str, Any]]:
        return requests.get(f"{self.url}/_stub/requests", params={"path_prefix": path_prefix}, timeout=5).json()[
            "requests"
        ]
