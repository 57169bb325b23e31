"""The error raised for any bad config: it names the file, the dotted key and what was expected."""


class ConfigError(ValueError):
    pass
