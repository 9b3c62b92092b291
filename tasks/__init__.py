"""Prefect tasks: thin wrappers that take URIs and manifests, call `adaptflow`, and return manifests."""

import adaptflow  # noqa: F401  first: it chooses Arrow's allocator before pyarrow loads
