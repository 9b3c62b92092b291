"""Prefect tasks: thin wrappers that take URIs and manifests, call `adaptflow`, and return manifests."""
