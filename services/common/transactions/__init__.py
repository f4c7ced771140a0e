"""One Kafka transaction of the runner: records, tagged offsets, commit, on the client
`CHOREO_TRANSACTION_CLIENT` names.

The runner hands over everything one transaction carries and gets each record's offset back, or one
of two errors: `FencedError` (a newer owner took over; the instance must stop) or `TransactionFailedError`
(nothing of it landed; redo it from the last commit with a new producer).

- `kip890` (the default): three requests a transaction, as KIP-890's second version has them, on
  aiokafka's connections (`kip890.py`). Needs a cluster that finalizes `transaction.version` 2.
- `aiokafka`: aiokafka's producer, five requests a transaction (`on_aiokafka.py`).
- `confluent`: librdkafka, the protocol in C on its own threads (`on_librdkafka.py`).
"""

from __future__ import annotations

from services.common.settings import ChoreoSettings
from services.common.transactions.kip890 import Kip890Transactions
from services.common.transactions.on_aiokafka import AiokafkaTransactions
from services.common.transactions.on_librdkafka import ConfluentTransactions
from services.common.transactions.records import (
    BATCH_BYTES,
    FencedError,
    Outgoing,
    TransactionFailedError,
    Transactions,
    Written,
)

__all__ = [
    "BATCH_BYTES",
    "FencedError",
    "Outgoing",
    "TransactionFailedError",
    "Transactions",
    "Written",
    "fence",
    "transactions",
]


def transactions(settings: ChoreoSettings, transactional_id: str) -> Transactions:
    """A producer of `transactional_id` on the client `CHOREO_TRANSACTION_CLIENT` names."""
    if settings.transaction_client == "confluent":
        return ConfluentTransactions(settings, transactional_id)
    if settings.transaction_client == "aiokafka":
        return AiokafkaTransactions(settings, transactional_id)
    return Kip890Transactions(settings, transactional_id)


async def fence(settings: ChoreoSettings, transactional_id: str) -> None:
    """Fence every earlier producer of `transactional_id`: starting one is the fence."""
    producer = transactions(settings, transactional_id)
    await producer.start()
    await producer.stop()
