"""Deployment: manifests for running a hotwire cluster elsewhere (Kubernetes)."""
