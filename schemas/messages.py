"""The Firehose message types and what each one needs."""

from __future__ import annotations

FIREHOSE_VERSION = "3.2.0"

REGISTRATION = "module_registration_request"
EVENTS = "event_processing_request"
SUBSCRIPTION = "audience_subscription_request"
MEMBERSHIP = "audience_membership_change_request"
DSR = "dsr_processing_request"

# Request type -> (response type, HTTP status). mParticle accepts 200 or 202; 202 says
# "queued, not yet delivered", which is what an event batch is when we answer.
RESPONSES: dict[str, tuple[str, int]] = {
    REGISTRATION: ("module_registration_response", 200),
    EVENTS: ("event_processing_response", 202),
    SUBSCRIPTION: ("audience_subscription_response", 200),
    MEMBERSHIP: ("audience_membership_change_response", 200),
    DSR: ("dsr_processing_response", 200),
}

REQUEST_TYPES = frozenset(RESPONSES)
RESPONSE_TYPES = frozenset(response for response, _ in RESPONSES.values())

# Messages that carry no account: registration comes before any account exists, and the
# SDK's own DSR samples and fixtures carry none (protocol spec §10.1).
ACCOUNTLESS_TYPES = frozenset({REGISTRATION, DSR})
# The SDK's DSR fixture omits id and timestamp_ms too.
ENVELOPE_OPTIONAL_TYPES = frozenset({DSR})
