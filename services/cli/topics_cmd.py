"""`choreo topics create|describe`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from services.common.settings import ChoreoSettings
from services.common.topics import TopicDescription, describe_topics, ensure_topics


def add_topics_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("topics", help="provision or inspect the topics")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create every topic with its configuration (idempotent)")
    create.set_defaults(handler=_create)
    describe = actions.add_parser("describe", help="partitions and configuration as the broker reports them")
    describe.add_argument("--json", action="store_true", help="one JSON object per topic")
    describe.set_defaults(handler=_describe)


def _create(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    for topic in asyncio.run(ensure_topics(settings)):
        state = "created" if topic.created else "ok"
        sys.stdout.write(f"{state:8} {topic.name} ({topic.partitions} partitions)\n")
    return 0


def _describe(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    topics = asyncio.run(describe_topics(settings))
    if not topics:
        sys.stdout.write("no topics yet: run `choreo topics create`\n")
        return 1
    for topic in topics:
        sys.stdout.write((json.dumps(topic.__dict__) if args.json else _table_row(topic)) + "\n")
    return 0


def _table_row(topic: TopicDescription) -> str:
    config = " ".join(f"{key}={value}" for key, value in topic.config.items())
    return f"{topic.name:22} partitions={topic.partitions} replicas={topic.replication_factor} {config}"
