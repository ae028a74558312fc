from celery import Celery

app = Celery("pkgproj", broker="memory://", set_as_current=False)
app.conf.imports = ("pkgproj.jobs",)


@app.task
def ping():
    return "pong"
