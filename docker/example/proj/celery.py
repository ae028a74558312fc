"""The project's Celery app, configured from the environment.

With no environment at all it runs on kombu's ``filesystem://`` broker and
Celery's ``file://`` result backend under ``./demo-data``, so the demo needs
no server. docker/compose.yaml points the same project at Redis and RabbitMQ.
"""

import os

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

# ``filesystem://`` with atomic publishing (kombu's loses a message now and
# then: atomic_filesystem.py).
TRANSPORT_ALIASES["filesystem"] = "proj.atomic_filesystem:Transport"

DATA = os.path.abspath(os.environ.get("DEMO_DATA_DIR", "demo-data"))

app = Celery("proj", include=["proj.tasks"])
app.conf.update(
    broker_url=os.environ.get("BROKER_URL", "filesystem://"),
    result_backend=os.environ.get("RESULT_BACKEND", f"file://{DATA}/results"),
    task_track_started=True,
)
if app.conf.broker_url.startswith("filesystem"):
    for sub in ("queue", "results", "control"):
        os.makedirs(os.path.join(DATA, sub), exist_ok=True)
    app.conf.broker_transport_options = {
        "data_folder_in": os.path.join(DATA, "queue"),
        "data_folder_out": os.path.join(DATA, "queue"),
        "control_folder": os.path.join(DATA, "control"),
        "polling_interval": 0.05,
    }
