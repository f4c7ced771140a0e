"""The requests of a transaction of KIP-890's second version, in aiokafka's protocol types.

aiokafka 0.14 encodes v0 of the transaction calls only. Produce v12, TxnOffsetCommit v5 and EndTxn v5 are
what the Java client sends once a cluster finalizes `transaction.version` 2: the partition leader and the
group coordinator add what they are sent to the transaction themselves, and each EndTxn bumps the epoch.
ApiVersions v3 says which `transaction.version` the cluster has finalized.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from aiokafka.protocol.api import RequestStruct, Response, ResponseHeader_v0
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactBytes,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)

TEXT = CompactString("utf-8")
NO_TAGS: dict[int, bytes] = {}


def tagged(*fields: tuple[str, Any]) -> Schema:
    """A flexible version's struct: its fields, then its tagged fields."""
    return Schema(*fields, ("tags", TaggedFields))


def tagged_array(*fields: tuple[str, Any]) -> CompactArray:
    """A flexible version's array of structs."""
    return CompactArray(*fields, ("tags", TaggedFields))


class ProduceResponseV12(Response):  # type: ignore[misc]  # aiokafka has no type hints
    API_KEY = 0
    API_VERSION = 12
    SCHEMA = tagged(
        (
            "topics",
            tagged_array(
                ("name", TEXT),
                (
                    "partitions",
                    tagged_array(
                        ("index", Int32),
                        ("error_code", Int16),
                        ("base_offset", Int64),
                        ("log_append_time_ms", Int64),
                        ("log_start_offset", Int64),
                        ("record_errors", tagged_array(("batch_index", Int32), ("message", TEXT))),
                        ("error_message", TEXT),
                    ),
                ),
            ),
        ),
        ("throttle_time_ms", Int32),
    )


class ProduceRequestV12(RequestStruct):  # type: ignore[misc]  # aiokafka has no type hints
    API_KEY = 0
    API_VERSION = 12
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = ProduceResponseV12
    SCHEMA = tagged(
        ("transactional_id", TEXT),
        ("acks", Int16),
        ("timeout_ms", Int32),
        (
            "topics",
            tagged_array(("name", TEXT), ("partitions", tagged_array(("index", Int32), ("records", CompactBytes)))),
        ),
    )


class TxnOffsetCommitResponseV5(Response):  # type: ignore[misc]  # aiokafka has no type hints
    API_KEY = 28
    API_VERSION = 5
    SCHEMA = tagged(
        ("throttle_time_ms", Int32),
        ("topics", tagged_array(("name", TEXT), ("partitions", tagged_array(("index", Int32), ("error_code", Int16))))),
    )


class TxnOffsetCommitRequestV5(RequestStruct):  # type: ignore[misc]  # aiokafka has no type hints
    API_KEY = 28
    API_VERSION = 5
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = TxnOffsetCommitResponseV5
    SCHEMA = tagged(
        ("transactional_id", TEXT),
        ("group_id", TEXT),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", TEXT),
        ("group_instance_id", TEXT),
        (
            "topics",
            tagged_array(
                ("name", TEXT),
                (
                    "partitions",
                    tagged_array(("index", Int32), ("offset", Int64), ("leader_epoch", Int32), ("metadata", TEXT)),
                ),
            ),
        ),
    )


class EndTxnResponseV5(Response):  # type: ignore[misc]  # aiokafka has no type hints
    API_KEY = 26
    API_VERSION = 5
    SCHEMA = tagged(
        ("throttle_time_ms", Int32), ("error_code", Int16), ("producer_id", Int64), ("producer_epoch", Int16)
    )


class EndTxnRequestV5(RequestStruct):  # type: ignore[misc]  # aiokafka has no type hints
    API_KEY = 26
    API_VERSION = 5
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = EndTxnResponseV5
    SCHEMA = tagged(
        ("transactional_id", TEXT), ("producer_id", Int64), ("producer_epoch", Int16), ("committed", Boolean)
    )


class ApiVersionsResponseV3(Response):  # type: ignore[misc]  # aiokafka has no type hints
    API_KEY = 18
    API_VERSION = 3
    SCHEMA = tagged(
        ("error_code", Int16),
        ("api_keys", tagged_array(("api_key", Int16), ("min", Int16), ("max", Int16))),
        ("throttle_time_ms", Int32),
    )


class ApiVersionsRequestV3(RequestStruct):  # type: ignore[misc]  # aiokafka has no type hints
    API_KEY = 18
    API_VERSION = 3
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = ApiVersionsResponseV3
    SCHEMA = tagged(("client_software_name", TEXT), ("client_software_version", TEXT))

    def parse_response_header(self, read_buffer: BytesIO | bytes) -> Any:
        # The one flexible response whose header has no tagged fields: a client reads it before it
        # knows which versions the broker speaks.
        return ResponseHeader_v0.decode(read_buffer)


FINALIZED_FEATURES_TAG = 2
FEATURES = tagged_array(("name", TEXT), ("max_version_level", Int16), ("min_version_level", Int16))


def finalized_features(response: ApiVersionsResponseV3) -> dict[str, int]:
    """Each feature the cluster has finalized, with its level."""
    raw = response.tags.get(FINALIZED_FEATURES_TAG)
    if raw is None:
        return {}
    return {name: level for name, level, _, _ in FEATURES.decode(BytesIO(raw)) or ()}


class Exactly:
    """A request of one version, whatever the range the connection learnt for its key (aiokafka's
    `Request` picks among the versions it knows)."""

    def __init__(self, struct: RequestStruct) -> None:
        self.struct = struct

    def prepare(self, versions: dict[int, tuple[int, int]]) -> RequestStruct:
        return self.struct
