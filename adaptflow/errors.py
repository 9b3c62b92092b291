"""Errors a user is meant to read: the command line prints the message, never a traceback.

Two families, told apart by what helps:
- input errors (a bad config, a missing dataset, a store that cannot be written, a damaged model): fix the
  input; retrying changes nothing. Tasks fail at once; the command line exits with status 2.
- transient errors (`TransientError`: a store still unreachable after storage's own retries, Prefect's
  API not starting): the infrastructure may recover. Tasks retry them; the command line exits with 3.
"""


class AdaptflowError(Exception):
    """Base class for errors with a message fit for a user; by default caused by input or configuration."""

    exit_code = 2  # the command line's exit status for it


class TransientError(AdaptflowError):
    """Infrastructure that may recover by itself: retried by tasks, exit status 3 once retries are spent."""

    exit_code = 3


class ConfigError(AdaptflowError):
    """The configuration file or a `--set` override is invalid."""


class DatasetError(AdaptflowError):
    """A dataset URI is missing, empty, or holds no valid image."""


class StoreError(AdaptflowError):
    """The store holds something unreadable or incompatible, or cannot be reached or written."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A missing object or bucket in a remote store; still a FileNotFoundError for callers that expect one."""


class IncompatibleStoreError(StoreError):
    """The store was written by an adaptflow of another schema version: refused, never repaired."""


class StoreUnavailableError(StoreError, TransientError):
    """A store still unreachable (connection refused, timeouts, 5xx) after storage's own backoff."""


class ModelError(StoreError):
    """A model folder is missing or damaged: its card, its weights, or the two disagree."""


class ApiUnavailableError(TransientError):
    """Prefect's API cannot be reached, or its temporary server did not start."""


class UnknownNameError(AdaptflowError):
    """A name looked up in a registry does not exist; the message lists the valid names."""

    def __init__(self, family: str, name: str, valid: list[str]):
        self.family, self.name, self.valid = family, name, sorted(valid)
        super().__init__(f"unknown {family} {name!r}; valid {family}s: {', '.join(self.valid)}")


def lookup(registry: dict, family: str, name: str):
    """`registry[name]`, or an UnknownNameError that lists the valid names."""
    try:
        return registry[name]
    except KeyError:
        raise UnknownNameError(family, name, list(registry)) from None


def is_transient(e: BaseException) -> bool:
    """Worth retrying: a TransientError, or an error that is not adaptflow's own (an unexpected OSError
    from a library, say). Input errors are not, and neither is a timeout: it would run out again."""
    if isinstance(e, TransientError):
        return True
    return not isinstance(e, (AdaptflowError, TimeoutError))
