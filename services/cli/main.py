"""The `choreo` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from services.cli.audit_cmd import add_audit_commands
from services.cli.bench_cmd import add_bench_commands
from services.cli.broker_cmd import add_broker_commands
from services.cli.deadletter_cmd import add_deadletter_commands
from services.cli.monitor_cmd import add_monitor_commands
from services.cli.publish_cmd import InvalidCommandError, add_publish_commands
from services.cli.schemas_cmd import add_schemas_commands
from services.cli.soak_cmd import add_soak_commands
from services.cli.stack_cmd import add_stack_commands
from services.cli.topics_cmd import add_topics_commands
from services.common.logs import configure_logging
from services.common.settings import ChoreoSettings
from services.common.topics import RetentionSettingsError, TopicConfigurationError

log = logging.getLogger("choreo")

EXIT_INVALID_INPUT = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="choreo", description="Order sagas on Apache Kafka.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True)
    add_broker_commands(commands)
    add_topics_commands(commands)
    add_publish_commands(commands)
    add_schemas_commands(commands)
    add_audit_commands(commands)
    add_deadletter_commands(commands)
    add_monitor_commands(commands)
    add_bench_commands(commands)
    add_soak_commands(commands)
    add_stack_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("DEBUG" if args.verbose else "WARNING", structured=False)
    try:
        settings = ChoreoSettings()
    except ValidationError as error:
        sys.stderr.write(f"choreo: invalid settings: {error}\n")
        return EXIT_INVALID_INPUT
    try:
        code: int = args.handler(args, settings)
    except InvalidCommandError as error:
        sys.stderr.write(f"choreo: invalid input: {error}\n")
        return EXIT_INVALID_INPUT
    except RetentionSettingsError as error:
        sys.stderr.write(f"choreo: invalid settings: {error}\n")
        return EXIT_INVALID_INPUT
    except TopicConfigurationError as error:
        sys.stderr.write(f"choreo: topic configuration does not match the registry: {error}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
