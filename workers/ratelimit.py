"""The partner rate limit is one check of the partner gate, workers/gate.py, which also holds the
claims, the in-flight cap, the circuit breaker and the 429 pause of each API key.

Kept so `from workers.ratelimit import RateLimit` (parsed in common/, so Settings can check
PARTNER_RATE_LIMIT at start) goes on working.
"""

from __future__ import annotations

from common.ratelimit import RateLimit
from workers.gate import PartnerGate

__all__ = ["PartnerGate", "RateLimit"]
