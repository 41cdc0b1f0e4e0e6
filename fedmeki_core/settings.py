"""Loading a process's settings: YAML file, then environment, then command-line flags, one error type."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from fedmeki_core.errors import InvalidInputError

S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], config: Path | None, overrides: dict[str, Any]) -> S:
    """`config` (YAML) values, overridden by the environment, then by `overrides` that are not None.

    Any problem (unreadable file, unknown or invalid setting) raises InvalidInputError naming it.
    """
    values: dict[str, Any] = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInputError(f"cannot read {config}: {exc}") from None
        if not isinstance(loaded, dict):
            raise InvalidInputError(f"{config} must hold a mapping of settings")
        values.update(loaded)
    try:
        values.update(cls().model_dump(exclude_unset=True))  # what the environment sets
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        raise InvalidInputError(f"setting {field}: {message}") from None
