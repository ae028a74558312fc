from django.apps import AppConfig


class NotesConfig(AppConfig):
    name = "djproj_interop.notes"
    label = "notes"
