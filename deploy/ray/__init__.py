"""Ray Serve: `serve run deploy/ray/serve.yaml` (the application is deploy/ray/app.py)."""
