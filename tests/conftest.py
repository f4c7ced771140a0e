"""Fixtures shared by the whole suite; the broker fixtures come from `tests.kafka_fixtures`."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.common.settings import ChoreoSettings


@pytest.fixture
def choreo_settings(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> ChoreoSettings:
    """Settings for one test: the session's broker, and topic and group names no other test uses."""
    return ChoreoSettings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=unique_name("t") + ".",
        environment="test",
    )
