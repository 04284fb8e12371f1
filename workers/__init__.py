"""Celery workers: the inbox pump, the delivery tasks and the partner clients."""
