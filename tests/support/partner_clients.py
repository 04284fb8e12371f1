"""Partner clients for tests, named by PARTNER_CLIENT as a deployment would name its own."""

from __future__ import annotations

from collections.abc import Callable

from common.config import Settings
from workers.partner.base import Operation, PartnerResult


class RecordingPartnerClient:
    """Answers 200 to everything and keeps what it was sent, in this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sent: list[tuple[Operation, str]] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> RecordingPartnerClient:
        return cls(settings)

    def send(self, operation: Operation, idempotency_key: str) -> PartnerResult:
        self.sent.append((operation, idempotency_key))
        return PartnerResult(200)


class NoFactoryPartnerClient:
    """Has `send` but no `from_settings`: PARTNER_CLIENT must refuse it."""

    def send(self, operation: Operation, idempotency_key: str) -> PartnerResult:
        return PartnerResult(200)


class ScriptedPartnerClient:
    """Answers each call with the next scripted answer (a status, a PartnerResult or an exception
    to raise), then `default`; records every call, in this process, for unit tests of delivery."""

    def __init__(self, *answers: int | PartnerResult | Exception | None, default: int = 200) -> None:
        self.answers = list(answers)
        self.default = default
        self.calls: list[tuple[Operation, str]] = []
        # Run inside each call, before it answers: to look at Redis while a call is in flight.
        self.during_call: Callable[[Operation], None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ScriptedPartnerClient:
        return cls()

    def send(self, operation: Operation, idempotency_key: str) -> PartnerResult:
        self.calls.append((operation, idempotency_key))
        if self.during_call is not None:
            self.during_call(operation)
        answer = self.answers.pop(0) if self.answers else self.default
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, PartnerResult):
            return answer
        error = None if answer is not None and answer < 300 else f"HTTP {answer}: scripted"
        return PartnerResult(answer, error=error)

    @property
    def keys(self) -> list[str]:
        return [key for _, key in self.calls]
