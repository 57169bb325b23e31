"""YAML config → validated ``RunSpec`` (see ``pipeline.config.load`` for the rules).

``load_config(path, overrides, check_paths=True)`` returns a ``RunSpec`` that also carries
``spec.method_options``, the parsed ``Options`` of its method; ``dump_config(spec)`` writes the
resolved config back as YAML. Every bad key, type, value or path raises ``ConfigError``.
"""

from pipeline.config.errors import ConfigError
from pipeline.config.load import dump_config, load_config
from pipeline.config.schema import RunSpec

__all__ = ["ConfigError", "RunSpec", "dump_config", "load_config"]
