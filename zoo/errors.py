"""Every error RelZoo raises on purpose, in one place.

All derive from :class:`ZooError`, so ``except zoo.errors.ZooError`` catches
anything the library reports about bad input, and the CLI turns them into one
clear line and a non-zero exit.
"""


class ZooError(Exception):
    """Base class of RelZoo's own errors."""


class UnknownModelError(ZooError, KeyError):
    """A model name (or ``name.tag``) that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


class ConfigError(ZooError, ValueError):
    """A malformed ``configs/*.yaml`` or ``convert/*.yaml`` file (the message names file and field), or a
    bad setting: an environment variable's value, a ``backend`` name, an argument's value."""


class ArgumentError(ConfigError, TypeError):
    """A constructor argument of an unknown name or the wrong type (``create_model(name, bogus=1)``)."""


class WeightsError(ZooError):
    """Weights that cannot be found, fetched or loaded."""


class HashMismatchError(WeightsError):
    """A downloaded or local file whose sha256 differs from the expected one."""


class OfflineError(WeightsError):
    """Offline mode is on and the file is not in the cache."""


class UploadError(ZooError):
    """An upload to the Hugging Face Hub that the Hub refused or that could not reach it."""


class CheckpointError(ZooError):
    """A checkpoint that is corrupt, truncated, of an unknown format or holds a refused pickle global."""


class ConversionError(ZooError):
    """A state dict that does not fit its target: missing, unexpected or mis-shaped keys."""


class DatasetError(ZooError):
    """A dataset folder that is missing or not in the format a protocol expects."""


class OpsError(ZooError):
    """A native kernel that cannot be built or loaded when ``RELZOO_OPS=native`` demands it."""


class InputError(ZooError, ValueError):
    """A model input of the wrong rank, channel count, dtype or size (the message says what the model takes)."""


class InputTypeError(InputError, TypeError):
    """An input that is not a tensor, or a tensor of a dtype the op has no kernel for (also a TypeError)."""


class DependencyError(ZooError, ImportError):
    """An optional dependency that a feature needs is not installed (the message names the extra to install)."""
