"""The MONAI Label app (``monailabel start_server --app pipeline/serve``): ``main.py`` and its infer task."""
