"""Errors a user is meant to read: the command line prints the message, never a traceback."""


class AdaptflowError(Exception):
    """Base class for errors caused by input or configuration, with a message fit for a user."""


class ConfigError(AdaptflowError):
    """The configuration file or a `--set` override is invalid."""


class DatasetError(AdaptflowError):
    """A dataset URI is missing, empty, or holds no valid image."""


class StoreError(AdaptflowError):
    """The store holds something unreadable or incompatible, or cannot be reached or read."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A missing object or bucket in a remote store; still a FileNotFoundError for callers that expect one."""


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
