"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, files, arguments). The message is shown as is, one line."""


class ConfigError(UserError):
    """A config field has an unknown name or an impossible value."""


class DataError(UserError):
    """A data source or tokenizer cannot be read or does not fit."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or incompatible."""


class ScheduleError(UserError):
    """A model schedule cannot be read or does not fit the models or the step count."""


class SamplingError(UserError):
    """Sampler input that cannot work (prompts, settings)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stopped before the optimizer step."""
