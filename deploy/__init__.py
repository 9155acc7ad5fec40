"""Deployment beyond one process: Ray Serve (ray/) and Kubernetes manifests (k8s/)."""
