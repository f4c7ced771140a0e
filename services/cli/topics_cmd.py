"""`choreo topics create|describe`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from services.common.settings import ChoreoSettings
from services.common.topics import PartitionPlacement, TopicDescription, describe_topics, ensure_topics, human_ms


def add_topics_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("topics", help="provision or inspect the topics")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create", help="create every topic, or bring an existing one's configuration up to date (idempotent)"
    )
    create.set_defaults(handler=_create)
    describe = actions.add_parser("describe", help="partitions and configuration as the broker reports them")
    describe.add_argument("--json", action="store_true", help="one JSON object per topic")
    describe.set_defaults(handler=_describe)


def _create(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    topics = asyncio.run(ensure_topics(settings, update=True))
    for topic in topics:
        state = "created" if topic.created else "updated" if topic.changes else "ok"
        sys.stdout.write(f"{state:8} {topic.name} ({topic.partitions} partitions)\n")
        if not topic.created:
            for change in topic.changes:
                old = "(unset)" if change.old is None else _readable(change.key, change.old)
                sys.stdout.write(f"{'':8}   {change.key}: {old} -> {_readable(change.key, change.new)}\n")
    created = sum(topic.created for topic in topics)
    updated = sum(bool(topic.changes) and not topic.created for topic in topics)
    if created or updated:
        sys.stdout.write(f"{created} new, {updated} updated, {len(topics) - created - updated} already up to date\n")
    else:
        sys.stdout.write(f"nothing changed: all {len(topics)} topics already up to date\n")
    return 0


def _describe(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    topics = asyncio.run(describe_topics(settings))
    if not topics:
        sys.stdout.write("no topics yet: run `choreo topics create`\n")
        return 1
    for topic in topics:
        sys.stdout.write((json.dumps(_document(topic)) if args.json else _table_row(topic)) + "\n")
    return 0


def _document(topic: TopicDescription) -> dict[str, object]:
    return {
        "name": topic.name,
        "partitions": topic.partitions,
        "replication_factor": topic.replication_factor,
        "config": topic.config,
        "placement": [
            {"partition": p.partition, "leader": p.leader, "replicas": list(p.replicas), "isr": list(p.isr)}
            for p in topic.placement
        ],
    }


def _table_row(topic: TopicDescription) -> str:
    config = " ".join(f"{key}={_readable(key, value)}" for key, value in topic.config.items())
    row = f"{topic.name:22} partitions={topic.partitions} replicas={topic.replication_factor} {config}"
    return "\n".join([row, *(_placement_row(placement) for placement in topic.placement)])


def _placement_row(placement: PartitionPlacement) -> str:
    leader = placement.leader if placement.leader is not None else "none"
    replicas = ",".join(map(str, placement.replicas))
    isr = ",".join(map(str, placement.isr))
    flag = "  UNDER-REPLICATED" if placement.under_replicated else ""
    return f"  partition {placement.partition}: leader {leader}, replicas {replicas}, isr {isr}{flag}"


def _readable(key: str, value: str) -> str:
    """A duration in milliseconds gets its readable form beside it: `691200000 (8d)`."""
    if key.endswith(".ms") and value.lstrip("-").isdigit():
        return f"{value} ({human_ms(int(value))})"
    return value
