"""``-A nestpkg.inner``: dotted module name without an attribute."""
from celery import Celery

app = Celery("nestpkg.inner", broker="memory://", set_as_current=False)
