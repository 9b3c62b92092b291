"""The adaptflow command line."""

import adaptflow  # noqa: F401  first: it chooses Arrow's allocator before pyarrow loads
