"""The partner rate limit's text form ("50/second"), parsed here so Settings can check it at start.

The gate that enforces it lives in workers/ratelimit.py, which re-exports `RateLimit`; common/
must not import workers/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PERIODS = {"second": 1, "minute": 60, "hour": 3600}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(second|minute|hour)s?\s*$", re.IGNORECASE)
_NO_LIMIT = frozenset({"none", "0", "off"})


@dataclass(frozen=True)
class RateLimit:
    calls: int
    period_seconds: float

    @classmethod
    def parse(cls, text: str) -> RateLimit | None:
        """'50/second', '600/minute', '5/2seconds'; '' or 'none' for no limit."""
        if not text.strip() or text.strip().lower() in _NO_LIMIT:
            return None
        match = _LIMIT.match(text)
        if not match:
            raise ValueError(f"PARTNER_RATE_LIMIT must look like '50/second', not {text!r}")
        calls, multiple, unit = match.groups()
        if int(calls) == 0 or int(multiple or 1) == 0:
            # "0/second" would hold every call forever, "5/0seconds" let every call through.
            raise ValueError(f"PARTNER_RATE_LIMIT needs at least 1 call per period longer than 0, not {text!r}")
        return cls(int(calls), int(multiple or 1) * _PERIODS[unit.lower()])
