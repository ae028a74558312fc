from django.apps import AppConfig


class ProbesConfig(AppConfig):
    name = "djproj_extras.probes"
    label = "probes"
