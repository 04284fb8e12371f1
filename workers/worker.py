"""Worker entry point: `celery -A workers.worker worker` (and flower `-A workers.worker`).

The one place that builds the Flask app for the workers and sets up Celery and the inbox
pump on it, as Flask's Celery pattern does; nothing else in workers/ imports service/.
"""

from common.config import SettingsError
from service import create_app
from workers.celery_app import celery_init_app
from workers.runtime import PartnerClientError

try:
    flask_app = create_app(web=False)  # workers serve nothing: no token needed
    celery_app = celery_init_app(flask_app)
except (SettingsError, PartnerClientError) as error:
    # The lines that say what is wrong, not a traceback through Celery's app loader.
    raise SystemExit(str(error)) from None
