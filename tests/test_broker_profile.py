"""The broker profile's grouping of JFR samples (pure logic; the recording itself runs in `choreo bench --profile`)."""

from __future__ import annotations

from typing import Any

from benchmarks.broker_profile import render, summarize


def sample(thread: str, *frames: str) -> dict[str, Any]:
    """A `jfr print --json` sample; `frames` innermost first, as `package/Class.method`."""
    return {
        "type": "jdk.ExecutionSample",
        "values": {
            "sampledThread": {"javaName": thread},
            "stackTrace": {
                "frames": [
                    {"method": {"type": {"name": frame.rpartition(".")[0]}, "name": frame.rpartition(".")[2]}}
                    for frame in frames
                ]
            },
        },
    }


def test_samples_count_under_the_request_they_serve_or_their_thread() -> None:
    handler = "data-plane-kafka-request-handler-1"
    events = [
        sample(handler, "kafka/log/UnifiedLog.append", "kafka/server/KafkaApis.handleProduceRequest"),
        sample(handler, "kafka/log/UnifiedLog.append", "kafka/server/KafkaApis.handleProduceRequest"),
        sample(handler, "x/Y.z", "kafka/server/KafkaApis.handleEndTxnRequest", "kafka/server/KafkaApis.handle"),
        sample(handler, "kafka/server/KafkaApis.handleHeartbeatRequest"),
        sample("TxnMarkerSenderThread-1", "kafka/coordinator/transaction/TxnMarkerQueue.poll"),
        sample("data-plane-kafka-network-thread-1-ListenerName(PLAINTEXT)-PLAINTEXT-0", "sun/nio/ch/EPoll.wait"),
        sample("kafka-scheduler-3", "java/lang/Thread.run"),
    ]
    profile = summarize(events)
    # The network thread waiting in epoll spends no CPU and is left out
    assert profile.samples == 6
    assert profile.kinds == {
        "produce": 2 / 6,
        "transactions: end": 1 / 6,
        "consumer groups and offsets": 1 / 6,
        "transactions: marker sender": 1 / 6,
        "other": 1 / 6,
    }
    assert profile.top_self[0] == ("kafka.log.UnifiedLog.append", 2 / 6)
    assert "produce" in "\n".join(render(profile))
