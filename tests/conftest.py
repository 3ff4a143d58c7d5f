"""Shared pytest configuration: the sandbox fixtures (sandbox, namespace, kube_api)."""

pytest_plugins = ["weightsync.sandbox.pytest_plugin"]
