"""The error tree of swarm-aggregator: one root, errors that carry data."""

from __future__ import annotations

# The closed set of reasons a peer's message can be rejected for. Metrics label values,
# log lines and tests all use these names.
REASONS: tuple[str, ...] = (
    "too_large",        # more bytes than limits.max_message_bytes; never parsed
    "bad_frame",        # a transport frame that breaks its protocol (frame count, header)
    "not_json",         # not UTF-8 JSON (or nested too deeply to parse)
    "not_object",       # JSON, but not an object
    "missing_field",    # LOGITS or COMPONENT_ID absent
    "bad_component_id",  # COMPONENT_ID neither a string nor a number, or empty
    "bad_logits",       # LOGITS not a non-empty list of numbers (or of equal rows); null
    "non_finite",       # NaN or infinity in binary float32 logits (JSON has neither;
                        # finite JSON numbers past float32's range saturate to it)
    "bad_deterministic",  # DETERMINISTIC present but not a boolean
    "bad_key",          # a step-key field absent or not a string/integer
    "shape",            # batch or action count differs from the window's first message
    "duplicate",        # the same model twice in one window (lockstep: the newer replaces)
    "late",             # for a window that is already closed
    "unknown_model",    # not in the configured roster (window.model_ids)
    "too_many_models",  # models = 0: a window that already holds limits.max_models models
    "bad_command",      # an evolution message that could not be read
)


class SwarmAggregatorError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(SwarmAggregatorError, ValueError):
    """A configuration value is missing, unknown or invalid; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key
        self.message = message


class RejectedError(SwarmAggregatorError, ValueError):
    """A peer's message was rejected; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "", sender: str | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.sender = sender


class DecodeError(RejectedError):
    """The bytes of a message could not be turned into a valid message."""
