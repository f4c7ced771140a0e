"""The value of a record on the dead-letter topic, and the headers that carry its origin."""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

# A dead letter's origin is in its headers as well as in its value, as Kafka Connect
# (`__connect.errors.*`) and Spring Kafka (`kafka_dlt-*`) put it, so a tool can route or filter
# dead letters without parsing them. The original record's own headers are copied beside these,
# except any that already start with the prefix: on a dead letter, those name only its own origin.
DLT_HEADER_PREFIX = "choreo-dlt-"
DLT_ORIGINAL_TOPIC = f"{DLT_HEADER_PREFIX}original-topic"
DLT_ORIGINAL_PARTITION = f"{DLT_HEADER_PREFIX}original-partition"
DLT_ORIGINAL_OFFSET = f"{DLT_HEADER_PREFIX}original-offset"
DLT_ORIGINAL_TIMESTAMP = f"{DLT_HEADER_PREFIX}original-timestamp"
DLT_REASON = f"{DLT_HEADER_PREFIX}reason"
DLT_CONSUMER = f"{DLT_HEADER_PREFIX}consumer"
DLT_TIME = f"{DLT_HEADER_PREFIX}time"
# The value keeps the whole reason; a header is read by tools that print it on one line.
DLT_REASON_MAX_BYTES = 512

REPLAY_COUNT = "choreo-replay-count"
"""On a replayed record: how often its lineage was replayed from the dead-letter topic (decimal)."""

DEAD_LETTER_HEADERS: dict[str, str] = {
    DLT_ORIGINAL_TOPIC: "Topic the message was read from.",
    DLT_ORIGINAL_PARTITION: "Its partition (decimal).",
    DLT_ORIGINAL_OFFSET: "Its offset (decimal; -1 for a request handed over between two stages in process).",
    DLT_ORIGINAL_TIMESTAMP: "Its record timestamp, epoch milliseconds (decimal).",
    DLT_REASON: f"The reason, cut to at most {DLT_REASON_MAX_BYTES} bytes of UTF-8 (the value has it whole).",
    DLT_CONSUMER: "The service that rejected it.",
    DLT_TIME: "When it was dead-lettered, RFC 3339 in UTC.",
    REPLAY_COUNT: "Copied from the original record when it was itself a replay: replays of its lineage so far.",
}
"""The headers every dead letter carries (the last only when the original had it), for the contract."""


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
