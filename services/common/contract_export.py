"""Generates the published contract files in `schemas/` from the models: JSON Schema and AsyncAPI 3."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

import schemas
from schemas.deadletter import DEAD_LETTER_HEADERS, DeadLetter
from schemas.envelope import Envelope
from schemas.events import EVENT_TYPES, Event
from schemas.topics import PUBLIC_TOPICS, Topic
from services.common.settings import ChoreoSettings

SCHEMAS_DIR = Path(schemas.__file__).resolve().parent
JSON_SCHEMA_DIR = SCHEMAS_DIR / "jsonschema"
ASYNCAPI_FILE = SCHEMAS_DIR / "asyncapi.yaml"
_VERSION = "1.0.0"


@cache
def envelope_model(event_type: type[Event]) -> type[BaseModel]:
    """The envelope with `type` fixed to one event and `data` typed by it, for documentation."""
    name = event_type.__name__
    fields: dict[str, Any] = {
        field: (info.annotation, info) for field, info in Envelope.model_fields.items() if field not in ("type", "data")
    }
    fields["type"] = (Literal[name], Field(description="Event name."))
    fields["schema_version"] = (Literal[event_type.schema_version], Field(description="Version of `data`."))
    fields["data"] = (event_type, Field(description=(event_type.__doc__ or "").strip()))
    model: type[BaseModel] = create_model(
        f"{name}Envelope",
        __config__=ConfigDict(extra="forbid", title=f"{name} envelope"),
        __doc__=f"A {name} event in its envelope.",
        **fields,
    )
    return model


def json_schema_files() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for name, event_type in EVENT_TYPES.items():
        files[JSON_SCHEMA_DIR / f"{name}.json"] = _dump_json(
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                **envelope_model(event_type).model_json_schema(),
            }
        )
    files[JSON_SCHEMA_DIR / "DeadLetter.json"] = _dump_json(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", **DeadLetter.model_json_schema()}
    )
    return files


def asyncapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [envelope_model(event_type) for event_type in EVENT_TYPES.values()]
    models.append(DeadLetter)
    _, definitions = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    messages: dict[str, Any] = {
        name: {
            "name": name,
            "title": name,
            "summary": (event_type.__doc__ or "").strip(),
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{name}Envelope"},
            "bindings": {"kafka": {"key": {"type": "string", "description": "order_id"}}},
        }
        for name, event_type in EVENT_TYPES.items()
    }
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "DeadLetter",
        "summary": (DeadLetter.__doc__ or "").strip(),
        "contentType": "application/json",
        "payload": {"$ref": "#/components/schemas/DeadLetter"},
        "headers": {
            "type": "object",
            "description": "The original record's own headers, then these.",
            "properties": {name: {"type": "string", "description": text} for name, text in DEAD_LETTER_HEADERS.items()},
        },
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Choreo",
            "version": _VERSION,
            "description": "Order sagas on Apache Kafka. Every value is a JSON envelope keyed by `order_id`.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": ChoreoSettings.model_fields["bootstrap_servers"].default,
                "protocol": "kafka",
                "description": "The broker `make run` starts.",
            }
        },
        "channels": {_channel_id(topic): _channel(topic) for topic in PUBLIC_TOPICS},
        "operations": _operations(),
        "components": {"messages": messages, "schemas": definitions["$defs"]},
    }


def _channel_id(topic: Topic) -> str:
    return topic.name.replace(".", "_")


def _channel(topic: Topic) -> dict[str, Any]:
    names = [event.__name__ for event in topic.events] or (["DeadLetter"] if topic.name == "deadletter" else [])
    channel: dict[str, Any] = {
        "address": topic.name,
        "description": f"{topic.description} Key: {topic.key}. Value: {topic.value}.",
        "bindings": {
            "kafka": {
                "topic": topic.name,
                "topicConfiguration": {"cleanup.policy": [topic.config.get("cleanup.policy", "delete")]},
            }
        },
    }
    if names:
        channel["messages"] = {name: {"$ref": f"#/components/messages/{name}"} for name in names}
    return channel


def _operations() -> dict[str, Any]:
    # Written from a client's point of view: it sends commands and receives everything else.
    operations: dict[str, Any] = {}
    for topic in PUBLIC_TOPICS:
        if not topic.events and topic.name != "deadletter":
            continue
        action = "send" if topic.name in ("orders", "approval.decisions") else "receive"
        operations[f"{action}_{_channel_id(topic)}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{_channel_id(topic)}"},
        }
    return operations


def contract_files() -> dict[Path, str]:
    files = json_schema_files()
    files[ASYNCAPI_FILE] = yaml.safe_dump(asyncapi_document(), sort_keys=False, allow_unicode=True, width=120)
    return files


def stale_files() -> list[Path]:
    """Contract files that differ from what the models generate, or that should not exist."""
    wanted = contract_files()
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text(encoding="utf-8") != text]
    stale += [path for path in JSON_SCHEMA_DIR.glob("*.json") if path not in wanted]
    return sorted(stale)


def write_contract_files() -> list[Path]:
    JSON_SCHEMA_DIR.mkdir(exist_ok=True)
    wanted = contract_files()
    for path in JSON_SCHEMA_DIR.glob("*.json"):
        if path not in wanted:
            path.unlink()
    for path, text in wanted.items():
        path.write_text(text, encoding="utf-8")
    return sorted(wanted)


def _dump_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
