"""The value of a record on the dead-letter topic."""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class DeadLetter(BaseModel):
    """A message a consumer could not accept, kept whole with the reason, so nothing is lost."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str = Field(description="What was wrong, naming the field where there is one.")
    topic: str = Field(description="Topic the message was read from.")
    partition: int
    offset: int
    key_base64: str | None = Field(description="Original key bytes, base64.")
    value_base64: str | None = Field(description="Original value bytes, base64.")
    consumer: str = Field(description="The service that rejected it.")
    dead_lettered_at: AwareDatetime

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()
