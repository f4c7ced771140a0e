"""A task's keyed state: a store interface, interchangeable backends and a changelog checkpoint.

`KeyedStore` is what handlers see: JSON documents by key, each with an optional expiry time. Its
changes are held in memory until their Kafka transaction commits, then written to a backend in one
batch together with the changelog offset they correspond to (the checkpoint), so a crash in the
middle of a transaction never leaves its writes in the store and a restart replays only the
changelog after the checkpoint.
"""

from services.common.state.backend import Backend, Checkpoint
from services.common.state.keyed import KEEP, ChangelogRecord, KeyedStore
from services.common.state.memory import MemoryBackend

__all__ = ["KEEP", "Backend", "ChangelogRecord", "Checkpoint", "KeyedStore", "MemoryBackend"]
