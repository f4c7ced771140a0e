"""The monitor as a faust app: an agent on `audit`, two timers, a table on `monitor.state`, a web server."""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import faust
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.web import Request, Response, View
from opentelemetry.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from schemas.envelope import Envelope
from schemas.topics import AUDIT, MONITOR_ALERTS, MONITOR_STATE
from services.common.metrics import exposition, process_registry
from services.common.tracing import current_trace_headers, traceparent_of
from services.monitor.domain import SAGA_PREFIX, SERVICE_PREFIX, STATS_PREFIX, PartitionStats, SagaRecord, ServiceHealth
from services.monitor.engine import MonitorEngine
from services.monitor.metrics import MonitorMetrics
from services.monitor.probes import HttpProbe, LogProbe
from services.monitor.settings import MonitorSettings
from services.monitor.store import PartitionedTable, TableStore
from services.monitor.views import services_document, stuck_document

log = logging.getLogger(__name__)

TABLE_NAME = "state"
BATCH_MAX = 500
BATCH_WITHIN_S = 0.05


# --- faust reads uncommitted records unless exactly_once is on ---------------------------------------
# `audit` is written in transactions; an aborted one must not count as a saga step. faust chooses the
# isolation level only from processing_guarantee, so the consumer is switched to read_committed here.


class _ReadCommittedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._isolation_level = "read_committed"
        return consumer


class _ReadCommittedConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> Any:
        return _ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _ReadCommittedTransport(faust_aiokafka.Transport):
    Consumer = _ReadCommittedConsumer


class MonitorFaustApp(faust.App):
    def _new_transport(self) -> Any:
        return _ReadCommittedTransport(self.conf.broker_consumer, self)


# --- wiring -------------------------------------------------------------------------------------------


class _Ports:
    """The engine's view of Kafka and HTTP, over the faust app."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.http = HttpProbe()
        self.log = LogProbe(monitor.settings)

    async def send_alert(self, envelope: Envelope) -> None:
        # The record carries the trace context of the current span (the engine's span for the alert).
        headers = list(envelope.headers()) + list(current_trace_headers())
        sent = await self.monitor.alerts.send(key=envelope.key, value=envelope.to_bytes(), headers=headers, force=True)
        await sent

    async def flush(self) -> None:
        await self.monitor.table.acknowledged()

    async def check(self, url: str, timeout_s: float) -> tuple[bool, str]:
        return await self.http.check(url, timeout_s)

    async def alert_published(self, pending: Any) -> bool:
        return await self.log.alert_published(pending)

    async def caught_up(self, partition: int, processed_offset: int) -> bool:
        return await self.log.caught_up(partition, processed_offset)

    def owned_partitions(self) -> set[int]:
        return self.monitor.owned_partitions()

    async def resume_offsets(self) -> dict[int, int]:
        return await self.log.resume_offsets(self.monitor.app.conf.id)


class Monitor:
    """One monitor instance: `app` is the faust app to start; `port` serves /health, /metrics and /monitor/*.

    `registry` is the process's (a fresh one by default): what /metrics serves.
    """

    def __init__(
        self,
        settings: MonitorSettings,
        tracer_provider: TracerProvider | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else process_registry()
        self.metrics = MonitorMetrics(self.registry, tuple(settings.monitor_targets))
        self.port = settings.health_port or _free_port(settings.health_host)
        self.app = MonitorFaustApp(
            id=settings.group("monitor"),
            broker=[f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",")],
            broker_credentials=_credentials(settings),
            store="memory://",
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            # acks=all, as every producer of the stack: on a cluster a write is acknowledged once the in-sync
            # replicas (min.insync.replicas of them at least) have it. Faust's default, pinned against its env.
            producer_acks=-1,
            # Topics come from the registry (services.common.topics), never from faust's defaults.
            topic_allow_declare=False,
            topic_disable_leader=True,
            table_standby_replicas=0,
            consumer_auto_offset_reset="earliest",
            consumer_group_instance_id=settings.monitor_instance_id,
            broker_session_timeout=settings.monitor_session_timeout,
            broker_heartbeat_interval=min(3.0, settings.monitor_session_timeout / 3),
            web_enabled=True,
            web_bind=settings.health_host,
            web_port=self.port,
            web_host=settings.health_host,
            datadir=Path(tempfile.gettempdir()) / "choreo-monitor",
        )
        raw: dict[str, Any] = {
            "key_type": bytes,
            "value_type": bytes,
            "key_serializer": "raw",
            "value_serializer": "raw",
        }
        # faust's own acknowledgements are off for audit: its ack bookkeeping stops committing when an
        # offset is never delivered (faust-streaming #596; audit is written transactionally, so every
        # commit marker is such an offset), and then it keeps every acked offset in memory for ever.
        # The agent commits what it applied itself, once the state that implies is on the broker.
        self.audit = self.app.topic(settings.topic(AUDIT), **raw, acks=False)
        self.alerts = self.app.topic(settings.topic(MONITOR_ALERTS), **raw)
        changelog = self.app.topic(
            settings.topic(MONITOR_STATE),
            **raw,
            partitions=settings.partitions,
            compacting=True,
            # Table recovery reads it in large batches; no commit is attached to changelog reads.
            maxsize=131_072,
            allow_empty=True,
            # Nothing consumes the changelog as a stream, so no offset of it is ever acknowledged (faust's
            # own changelog topics say so too). With acks on, faust's livelock check took every partition
            # written since recovery for a stream that never started, and logged an ERROR every 7 s.
            acks=False,
        )
        self.table = PartitionedTable(
            self.app,
            name=TABLE_NAME,
            beacon=self.app.tables.beacon,
            changelog_topic=changelog,
            key_type=bytes,
            value_type=bytes,
            partitions=settings.partitions,
        )
        self.app.tables.add(self.table)
        self.ports = _Ports(self)
        self.engine = MonitorEngine(
            settings, TableStore(self.table), self.ports, tracer_provider=tracer_provider, metrics=self.metrics
        )
        self._gate = asyncio.Lock()
        self._reconciled_at: int | None = None
        self._wire()

    # --- state of the instance ----------------------------------------------------------------------

    def owned_partitions(self) -> set[int]:
        audit = self.settings.topic(AUDIT)
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == audit}

    @property
    def recovered(self) -> bool:
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        return bool(recovery.completed.is_set() and not recovery.in_recovery and not self.app.rebalancing)

    async def ready(self) -> bool:
        """Recovered, and whatever a crash left half done is settled, for the current assignment."""
        if not self.recovered:
            return False
        generation = self.app.rebalancing_count
        if self._reconciled_at == generation:
            return True
        async with self._gate:
            if self._reconciled_at != generation:
                await self.engine.reconcile()
                self._reconciled_at = generation
        return True

    def services(self) -> list[ServiceHealth]:
        records = (self.engine.load(key, ServiceHealth) for key in self.engine.store.keys(SERVICE_PREFIX))
        return sorted((r for r in records if r is not None), key=lambda r: r.service)

    def sagas(self) -> list[SagaRecord]:
        records = (self.engine.load(key, SagaRecord) for key in self.engine.store.keys(SAGA_PREFIX))
        return [r for r in records if r is not None]

    def stats(self) -> list[PartitionStats]:
        records = (self.engine.load(key, PartitionStats) for key in self.engine.store.keys(STATS_PREFIX))
        return [r for r in records if r is not None]

    async def close(self) -> None:
        await self.ports.http.close()
        await self.ports.log.close()

    # --- faust agent, timers and pages --------------------------------------------------------------

    def _wire(self) -> None:
        app, engine, settings = self.app, self.engine, self.settings

        @app.agent(self.audit, name="follow-audit")
        async def follow_audit(stream: Any) -> None:
            async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
                applied: dict[Any, int] = {}
                for event in events:
                    message = event.message
                    try:
                        engine.apply(message.partition, message.offset, message.value, _traceparent(message.headers))
                    except Exception:
                        log.exception("audit record not applied", extra={"offset": message.offset})
                    applied[message.tp] = max(applied.get(message.tp, -1), message.offset + 1)
                engine.end_batch()
                # The offsets are committed only once the state they imply is on the broker.
                await self.table.acknowledged()
                await self.commit(applied)

        health_tick = max(0.01, min(1.0, settings.unhealthy_interval / 2, settings.monitor_interval / 2))

        @app.timer(health_tick, name="health-checks")  # type: ignore[untyped-decorator]
        async def health_checks() -> None:
            await self._guarded(engine.check_health)

        @app.timer(settings.sla_tick, name="saga-sla")  # type: ignore[untyped-decorator]
        async def saga_sla() -> None:
            await self._guarded(engine.check_sagas)

        @app.page("/health")
        async def health(view: View, request: Request) -> Response:
            ready = self.recovered
            body = {
                "service": "monitor",
                "status": "ok" if ready else "starting",
                "partitions": sorted(self.owned_partitions()),
                "checks": engine.checks_done,
                "sla_rounds": engine.sla_rounds,
                "alerts": engine.alerts_sent,
            }
            return view.json(body, status=200 if ready else 503)

        @app.page("/metrics")
        async def metrics(view: View, request: Request) -> Response:
            # Passed as a header: aiohttp refuses a charset inside `content_type`.
            return view.bytes(exposition(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        @app.page("/monitor/services")
        async def services(view: View, request: Request) -> Response:
            return view.json(services_document(self.services()))

        @app.page("/monitor/sagas/stuck")
        async def stuck(view: View, request: Request) -> Response:
            return view.json(stuck_document(self.sagas(), self.stats(), settings.monitor_saga_sla))

    async def commit(self, offsets: dict[Any, int]) -> None:
        """Commit the audit offsets after a batch (partitions revoked meanwhile are left out by faust)."""
        if offsets:
            # faust's public commit() goes through the acknowledgements switched off above.
            consumer = cast(FaustConsumer, self.app.consumer)
            await consumer._commit_offsets(offsets)

    async def _guarded(self, work: Any) -> None:
        try:
            if await self.ready():
                await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A broker or HTTP hiccup must not stop the timer; the next tick tries again.
            log.exception("monitor tick failed")


def build_app(settings: MonitorSettings, tracer_provider: TracerProvider | None = None) -> Monitor:
    return Monitor(settings, tracer_provider)


def _traceparent(headers: Any) -> str | None:
    # faust hands a record's headers over as a list of pairs or as a mapping.
    if not headers:
        return None
    return traceparent_of(list(headers.items()) if isinstance(headers, Mapping) else headers)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _credentials(settings: MonitorSettings) -> Any:
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl_context = settings.kafka_options().get("ssl_context")
    if protocol.startswith("SASL"):
        password = settings.sasl_password.get_secret_value() if settings.sasl_password is not None else None
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=password,
            mechanism=settings.sasl_mechanism or "PLAIN",
            ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)
