"""The Firehose message types and what each one needs.

Every type name is declared here and only here; other modules import it.
"""

from __future__ import annotations

FIREHOSE_VERSION = "3.2.0"

REGISTRATION = "module_registration_request"
EVENTS = "event_processing_request"
SUBSCRIPTION = "audience_subscription_request"
MEMBERSHIP = "audience_membership_change_request"
DSR = "dsr_processing_request"

REGISTRATION_RESPONSE = "module_registration_response"
EVENTS_RESPONSE = "event_processing_response"
SUBSCRIPTION_RESPONSE = "audience_subscription_response"
MEMBERSHIP_RESPONSE = "audience_membership_change_response"
DSR_RESPONSE = "dsr_processing_response"

# Request type -> (response type, HTTP status). mParticle accepts 200 or 202; 202 says
# "queued, not yet delivered", which is what an event batch is when we answer.
RESPONSES: dict[str, tuple[str, int]] = {
    REGISTRATION: (REGISTRATION_RESPONSE, 200),
    EVENTS: (EVENTS_RESPONSE, 202),
    SUBSCRIPTION: (SUBSCRIPTION_RESPONSE, 200),
    MEMBERSHIP: (MEMBERSHIP_RESPONSE, 200),
    DSR: (DSR_RESPONSE, 200),
}

# The list each big message type carries its work in: where nearly all of its bytes are.
ITEMS_FIELD = {EVENTS: "events", MEMBERSHIP: "user_profiles"}

REQUEST_TYPES = frozenset(RESPONSES)
RESPONSE_TYPES = frozenset(response for response, _ in RESPONSES.values())

# Messages that carry no account: registration comes before any account exists, and the
# SDK's own DSR samples and fixtures carry none (protocol spec §10.1).
ACCOUNTLESS_TYPES = frozenset({REGISTRATION, DSR})
# The SDK's DSR fixture omits id and timestamp_ms too.
ENVELOPE_OPTIONAL_TYPES = frozenset({DSR})
