"""Error types. Every error raised on bad input names the field, the bad value and the fix."""


class FfaJaxError(Exception):
    """Base class of all errors raised by ffa_jax on bad input."""


class ConfigError(FfaJaxError, ValueError):
    """A configuration value is unknown, of the wrong type, out of range or inconsistent."""


class DataError(FfaJaxError, ValueError):
    """A data set or partition is empty, malformed or inconsistent with the config."""


class WeightsError(FfaJaxError, ValueError):
    """Model files are missing, or weights are missing, unexpected or of the wrong shape."""


class CheckpointError(FfaJaxError, ValueError):
    """A checkpoint is missing, truncated or does not belong to this run."""


class FederationError(FfaJaxError, ValueError):
    """A federated deployment is inconsistent with the run: a node's partition, a message's
    arrays (names, shapes, dtypes, values) or a peer's reply do not match what the run expects."""
