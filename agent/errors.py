"""Errors a user can cause. Each message names the field or thing at fault and what to do."""


class RLChatError(Exception):
    """Base class for every error rlchat raises on purpose."""


class ConfigError(RLChatError):
    """A setting is missing, malformed or out of range."""


class ValidationError(RLChatError, ValueError):
    """Input to the store, the agent or a job breaks a documented limit."""


class NotFoundError(RLChatError, LookupError):
    """A referenced row (message, user, model version, ...) does not exist."""


class DatabaseError(RLChatError):
    """The database cannot be reached or is not at the schema this code expects."""


class PermissionDenied(RLChatError):
    """The caller's role does not allow this action."""
