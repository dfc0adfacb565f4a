"""Strict: the base of the OpenAI request models. No field is silently ignored: a field the server does not
implement is refused with 400 naming it, unless it asks for nothing (null) or is one that OpenAI clients send
routinely and that changes no output (ACCEPTED_UNUSED, the one list of them)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

# Accepted and unused: bookkeeping fields of OpenAI's API that change no output here.
ACCEPTED_UNUSED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})


def refuse(model: BaseModel, field: str, message: str, value: Any = None) -> ValidationError:
    """A ValidationError located at ``field`` (so the 400 names it), for validators to raise."""
    error = PydanticCustomError("unsupported_value", message)
    return ValidationError.from_exception_data(type(model).__name__,
                                               [InitErrorDetails(type=error, loc=(field,), input=value)])


class Strict(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), populate_by_name=True)

    @model_validator(mode="after")
    def _refuse_unknown_fields(self):
        unknown = {k: v for k, v in (self.model_extra or {}).items() if v is not None and k not in ACCEPTED_UNUSED}
        if unknown:
            error = PydanticCustomError("unsupported_field", "is not supported by this server; remove it (the "
                                        "README's OpenAI API section lists what is)")
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=error, loc=(k,), input=v) for k, v in unknown.items()])
        return self
