"""`choreo deadletter`: list, inspect and replay what the services dead-lettered."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.deadletter import REPLAY_COUNT
from services.cli.arguments import positive_int
from services.common.deadletters import (
    DeadLetterTopicMissingError,
    Header,
    LetterId,
    Replay,
    Selection,
    StoredDeadLetter,
    partition_counts,
    plan_replays,
    read_dead_letters,
    rfc3339_ms,
    send_replays,
)
from services.common.settings import ChoreoSettings

EXIT_FAILED = 1
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def add_deadletter_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deadletter = subparsers.add_parser("deadletter", help="list, inspect and replay dead-lettered messages")
    actions = deadletter.add_subparsers(dest="action", required=True)

    listing = actions.add_parser("list", help="one line per dead letter: id, origin, consumer, time, reason")
    _add_filters(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="dead letters decoded: reason, origin, headers, key and value")
    show.add_argument("ids", nargs="+", type=_letter_id, metavar="ID", help="PARTITION:OFFSET, as `list` prints")
    show.set_defaults(handler=_show)

    replay = actions.add_parser(
        "replay", help="send dead letters back to their original topic, with their key, value and headers"
    )
    replay.add_argument("ids", nargs="*", type=_letter_id, metavar="ID", help="PARTITION:OFFSET, as `list` prints")
    _add_filters(replay)
    replay.add_argument("--all", action="store_true", help="every dead letter (without ids or filters)")
    replay.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    replay.add_argument(
        "--max-replays",
        type=positive_int,
        metavar="N",
        help="refuse a message replayed N times already (default CHOREO_DEADLETTER_MAX_REPLAYS, 3)",
    )
    replay.set_defaults(handler=_replay)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", metavar="TEXT", help="the reason contains TEXT (any case)")
    parser.add_argument("--topic", help="read from this topic (with or without the topic prefix)")
    parser.add_argument("--consumer", metavar="SERVICE", help="rejected by this service")
    parser.add_argument(
        "--since",
        type=_moment,
        metavar="TIME",
        help="dead-lettered at or after TIME: ISO 8601 (UTC unless it has an offset) or a time ago such as 30m, 2h, 7d",
    )
    parser.add_argument("--until", type=_moment, metavar="TIME", help="dead-lettered at or before TIME (as --since)")


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(reason=args.reason, topic=args.topic, consumer=args.consumer, since=args.since, until=args.until)


def _filtered(args: argparse.Namespace) -> bool:
    return any(value is not None for value in (args.reason, args.topic, args.consumer, args.since, args.until))


def _list(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    try:
        found = asyncio.run(read_dead_letters(settings))
    except DeadLetterTopicMissingError as error:
        sys.stderr.write(f"choreo: {error}\n")
        return EXIT_FAILED
    _warn_unreadable(found.unreadable)
    selection = _selection(args)
    letters = [stored for stored in found.letters if selection.matches(stored, settings.topic_prefix)]
    if not letters and not args.json:
        sys.stderr.write("choreo: no dead letters" + (" match" if _filtered(args) else "") + "\n")
    for stored in letters:
        sys.stdout.write((json.dumps(_as_json(stored)) if args.json else _line(stored)) + "\n")
    return 0


def _show(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    ids: list[LetterId] = args.ids
    try:
        found = asyncio.run(read_dead_letters(settings, ids))
    except DeadLetterTopicMissingError as error:
        sys.stderr.write(f"choreo: {error}\n")
        return EXIT_FAILED
    _warn_unreadable(found.unreadable)
    by_id = {stored.id: stored for stored in found.letters}
    unreadable = {entry.id for entry in found.unreadable}
    missing = [letter_id for letter_id in ids if letter_id not in by_id and letter_id not in unreadable]
    shown = [by_id[letter_id] for letter_id in dict.fromkeys(ids) if letter_id in by_id]
    sys.stdout.write("\n".join(_describe(stored) for stored in shown))
    for letter_id in missing:
        sys.stderr.write(f"choreo: no dead letter at {letter_id}\n")
    return EXIT_FAILED if missing or unreadable else 0


def _replay(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    ids: list[LetterId] = args.ids
    if not ids and not _filtered(args) and not args.all:
        sys.stderr.write("choreo: name dead letters by id, or select them with filters (--reason, ...) or --all\n")
        return EXIT_FAILED
    max_replays: int = args.max_replays if args.max_replays is not None else settings.deadletter_max_replays
    try:
        replays, missing = asyncio.run(_plan(settings, ids, _selection(args), max_replays))
    except DeadLetterTopicMissingError as error:
        sys.stderr.write(f"choreo: {error}\n")
        return EXIT_FAILED
    for letter_id, why in missing:
        sys.stdout.write(f"skipped {letter_id}: {why}\n")
    counts = {"send": 0, "refuse": 0, "skip": len(missing)}
    failed = len(missing)
    for replay in replays:
        counts[replay.outcome] += 1
        if replay.outcome == "refuse" or (replay.outcome == "skip" and replay.same_as is None):
            failed += 1
        if replay.outcome == "refuse":
            sys.stdout.write(f"refused {replay.stored.id}: {replay.detail}\n")
        elif replay.outcome == "skip":
            sys.stdout.write(f"skipped {replay.stored.id}: {replay.detail}\n")
        elif args.dry_run:
            sys.stdout.write(f"would send {replay.stored.id} to {replay.detail}: {_record_summary(replay)}\n")
    if not args.dry_run:
        for sent in asyncio.run(send_replays(settings, replays)):
            sys.stdout.write(
                f"sent {sent.replay.stored.id} to {sent.replay.topic} partition {sent.partition} offset {sent.offset}: "
                f"{_record_summary(sent.replay)}\n"
            )
    verb = "would send" if args.dry_run else "sent"
    note = "; dry run, nothing was sent" if args.dry_run else ""
    sys.stdout.write(f"{verb} {counts['send']}, refused {counts['refuse']}, skipped {counts['skip']}{note}\n")
    # A second dead letter of a record that goes back anyway is no failure; anything else not sent is.
    return EXIT_FAILED if failed else 0


async def _plan(
    settings: ChoreoSettings, ids: Sequence[LetterId], selection: Selection, max_replays: int
) -> tuple[list[Replay], list[tuple[LetterId, str]]]:
    """The replays of the selected dead letters, and the ids named that could not be read."""
    found = await read_dead_letters(settings, ids or None)
    missing = [(entry.id, entry.error) for entry in found.unreadable]
    if ids:
        present = {stored.id for stored in found.letters} | {entry.id for entry in found.unreadable}
        absent = [letter_id for letter_id in dict.fromkeys(ids) if letter_id not in present]
        missing += [(letter_id, "no dead letter at this id") for letter_id in absent]
    selected = [stored for stored in found.letters if selection.matches(stored, settings.topic_prefix)]
    partitions = await partition_counts(settings, {stored.letter.topic for stored in selected})
    return plan_replays(selected, max_replays=max_replays, partitions=partitions), missing


def _line(stored: StoredDeadLetter) -> str:
    letter = stored.letter
    origin = f"{letter.topic}[{letter.partition}]@{letter.offset}"
    count = stored.replay_count
    # A replayed message says so before its reason: how close it is to the replay limit.
    replays = "" if count == 0 else f"(replay {count if count is not None else '?'}) "
    reason = " ".join(letter.reason.split())
    return f"{stored.id}  {origin}  {letter.consumer}  {rfc3339_ms(letter.dead_lettered_at)}  {replays}{reason}"


def _as_json(stored: StoredDeadLetter) -> dict[str, Any]:
    return {
        "id": str(stored.id),
        "deadletter_partition": stored.id.partition,
        "deadletter_offset": stored.id.offset,
        **stored.letter.model_dump(mode="json"),
        "replay_count": stored.replay_count,
        "headers": [
            {"name": name, "value_base64": base64.b64encode(value).decode() if value is not None else None}
            for name, value in stored.original_headers
        ],
    }


def _describe(stored: StoredDeadLetter) -> str:
    letter = stored.letter
    lines = [
        f"dead letter {stored.id}",
        f"  reason:    {letter.reason}",
        f"  origin:    {letter.topic} partition {letter.partition} offset {letter.offset}",
        f"  consumer:  {letter.consumer}",
        f"  at:        {rfc3339_ms(letter.dead_lettered_at)}",
        f"  replays:   {stored.replay_count if stored.replay_count is not None else 'unreadable'}",
        f"  key:       {_shown_bytes(stored.key)}",
    ]
    headers: Sequence[Header] = stored.original_headers
    lines.append("  headers:" + ("" if headers else "   none"))
    lines += [f"    {name}: {_shown_bytes(value)}" for name, value in headers]
    value = stored.value
    document = _json_document(value)
    if document is None:
        lines.append(f"  value:     {_shown_bytes(value)}")
    else:
        lines.append("  value (JSON):")
        lines.append(textwrap.indent(json.dumps(document[0], indent=2, ensure_ascii=False), "    "))
    return "\n".join(lines) + "\n"


def _json_document(raw: bytes | None) -> tuple[Any] | None:
    """The parsed value in a 1-tuple (JSON `null` is a document too), or None if it is not JSON."""
    if raw is None:
        return None
    try:
        return (json.loads(raw),)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _shown_bytes(raw: bytes | None) -> str:
    """Text as its Python repr; bytes that are not UTF-8 as base64; a missing value as null."""
    if raw is None:
        return "null"
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return f"base64:{base64.b64encode(raw).decode()}"


def _record_summary(replay: Replay) -> str:
    value = replay.stored.value
    size = "null value" if value is None else f"{len(value)} bytes"
    count = (dict(replay.headers).get(REPLAY_COUNT) or b"?").decode()
    return f"key {_shown_bytes(replay.stored.key)}, {size}, {len(replay.headers)} headers, {REPLAY_COUNT} {count}"


def _warn_unreadable(entries: Sequence[Any]) -> None:
    for entry in entries:
        sys.stderr.write(f"choreo: skipped record {entry.id} of the dead-letter topic: {entry.error}\n")


def _letter_id(text: str) -> LetterId:
    try:
        return LetterId.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_moment(text: str, now: datetime) -> datetime:
    """`2h` (that long before `now`) or an ISO 8601 time, UTC when it has no offset."""
    relative = _RELATIVE.match(text)
    if relative is not None:
        amount, unit = relative.groups()
        return now - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO 8601 time nor a time ago such as 30m, 2h, 7d") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _moment(text: str) -> datetime:
    try:
        return parse_moment(text, datetime.now(UTC))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
