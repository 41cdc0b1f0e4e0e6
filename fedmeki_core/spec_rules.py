"""What every section of a job spec shares: its base model, the validation contexts (a new job's submission, a
stored job's reading), the bounds a new job meets, and the checks of names shown in terminals and logs."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationInfo
from pydantic_core import PydanticCustomError


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error of a model-level check that names the field it is about."""
    return PydanticCustomError("fedmeki_field", "{message}", {"field": field, "message": message})


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float finite


# A new job meets more than a stored one: the bounds below came after some jobs were stored, and a stored job must
# still load (to be listed, shown, finished). `parse_job_spec` checks them; reading a stored spec does not.
SUBMISSION = "submission"  # the validation context key that asks for them
STORED = "stored"  # the context key of a stored spec's reading: types and field constraints only
MAX_DEADLINE_SECONDS = 7 * 24 * 3600.0  # a round (or an injection) may wait a week for its silos, no longer
# (field, lowest, highest) of a new job's numbers.
SUBMISSION_BOUNDS: tuple[tuple[str, float, float], ...] = (
    ("min_silos", 1, 100_000),
    ("round_deadline_seconds", 0, MAX_DEADLINE_SECONDS),
    ("seed", 0, 2**63 - 1),
    ("privacy.dp.clip_norm", 0, 1e6),
    ("privacy.dp.noise_multiplier", 0, 1000),  # past ~10 noise drowns any update; the bound keeps noise x clip finite
    ("privacy.ckks_max_norm", 0, 1e30),
    ("injection.lora_alpha", 1, 65536),
    ("injection.top_k", 1, 256),
    ("injection.deadline_seconds", 0, MAX_DEADLINE_SECONDS),
)
MAX_NAME = 200  # characters of a silo name or a language model's name or folder (4096)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # newlines, NUL, escapes (a terminal's or a log's)


def submitting(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(SUBMISSION))


def reading_stored(info: ValidationInfo) -> bool:
    """Reading a stored spec: it met every rule at its submission, so none runs again (fedmeki_core/stored_spec.py)."""
    return bool(info.context and info.context.get(STORED))


def text_error(field: str, value: str, longest: int) -> PydanticCustomError | None:
    """The error of a name shown in terminals and logs: 1 to `longest` characters, no control character."""
    if not 1 <= len(value) <= longest:
        return field_error(field, f"must be 1 to {longest} characters")
    if CONTROL_CHARACTERS.search(value):
        return field_error(field, "must not contain control characters (newlines, NUL, terminal escapes)")
    return None
