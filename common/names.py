"""Names the web, the workers and the tools must agree on, declared once.

Imports nothing of ours, so any module may import it without pulling in a side.
"""

from __future__ import annotations

# Delivery tasks, by stable name: queued tasks carry these, so renaming one strands the
# messages already queued under it.
DELIVER_TASK = "firehose.deliver"
DELIVER_EVENTS_TASK = "firehose.deliver_events"

# Celery's delivery queue: a Redis list of this name on the broker.
DELIVERY_QUEUE = "firehose"

# The consumer group the workers' pumps read the inbox stream with.
INBOX_GROUP = "relay"
