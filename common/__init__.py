"""What the web and the workers share: settings, Redis connections and key names.

Nothing here imports Flask request code or Celery tasks, so both sides can use it.
"""
