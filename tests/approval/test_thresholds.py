"""Approval thresholds per currency (CHOREO_APPROVAL_THRESHOLDS), through the real app and settings (no broker)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from schemas.events import ApprovalGranted, ApprovalRequested
from schemas.topics import PAYMENT_EVENTS
from services.approval.domain import ApprovalStatus
from services.approval.settings import ApprovalSettings
from tests.approval.support import Harness, charged, only

THRESHOLDS = "EUR=1000,USD=1100,JPY=150000"


def given_thresholds(monkeypatch: pytest.MonkeyPatch, raw: str) -> Harness:
    monkeypatch.setenv("CHOREO_APPROVAL_THRESHOLDS", raw)
    return Harness(ApprovalSettings(_env_file=None))


# --- the rule -----------------------------------------------------------------------------------


def test_a_1000_jpy_order_is_granted_by_the_system_while_1000_eur_needs_a_reviewer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given thresholds per currency
    h = given_thresholds(monkeypatch, THRESHOLDS)

    # When a 1,000 JPY and a 1,000 EUR order are charged
    yen = only(h.feed(PAYMENT_EVENTS, charged("o-jpy", "1000", currency="JPY")))
    euro = only(h.feed(PAYMENT_EVENTS, charged("o-eur", "1000.00", currency="EUR")))

    # Then the yen order is below its threshold and the euro order at its own
    assert isinstance(yen.data, ApprovalGranted)
    assert (yen.data.reviewer, yen.data.reason) == ("system", "below threshold")
    assert isinstance(euro.data, ApprovalRequested)
    assert (euro.data.amount, euro.data.currency) == (Decimal("1000.00"), "EUR")
    jpy_state, eur_state = h.state("o-jpy"), h.state("o-eur")
    assert jpy_state is not None
    assert eur_state is not None
    assert (jpy_state.status, eur_state.status) == (ApprovalStatus.GRANTED, ApprovalStatus.PENDING)


@pytest.mark.parametrize(
    ("currency", "below", "at"),
    [("EUR", "999.99", "1000.00"), ("USD", "1099.99", "1100.00"), ("JPY", "149999", "150000")],
)
def test_each_listed_currency_is_reviewed_from_its_own_threshold_inclusive(
    monkeypatch: pytest.MonkeyPatch, currency: str, below: str, at: str
) -> None:
    # Given thresholds per currency
    h = given_thresholds(monkeypatch, THRESHOLDS)

    # When one order just below and one exactly at the currency's threshold are charged
    small = only(h.feed(PAYMENT_EVENTS, charged("o-below", below, currency=currency)))
    large = only(h.feed(PAYMENT_EVENTS, charged("o-at", at, currency=currency)))

    # Then only the one at the threshold waits for a reviewer
    assert isinstance(small.data, ApprovalGranted)
    assert isinstance(large.data, ApprovalRequested)


def test_a_currency_not_listed_falls_back_to_the_single_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given thresholds for EUR, USD and JPY and the default single threshold (1,000.00)
    monkeypatch.setenv("CHOREO_APPROVAL_THRESHOLD", "500")
    h = given_thresholds(monkeypatch, THRESHOLDS)

    # When orders in a currency not listed (GBP) are charged around the single threshold
    small = only(h.feed(PAYMENT_EVENTS, charged("o-small", "499.99", currency="GBP")))
    large = only(h.feed(PAYMENT_EVENTS, charged("o-large", "500.00", currency="GBP")))

    # Then the single threshold decides
    assert isinstance(small.data, ApprovalGranted)
    assert isinstance(large.data, ApprovalRequested)


def test_without_the_setting_every_currency_uses_the_single_threshold() -> None:
    # Given no thresholds per currency
    h = Harness(ApprovalSettings(_env_file=None))
    assert h.settings.approval_thresholds == {}

    # When 1,000 JPY (at the default threshold of 1,000) is charged
    yen = only(h.feed(PAYMENT_EVENTS, charged("o-jpy", "1000", currency="JPY")))

    # Then it needs a reviewer like 1,000 EUR would
    assert isinstance(yen.data, ApprovalRequested)


# --- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (THRESHOLDS, {"EUR": Decimal(1000), "USD": Decimal(1100), "JPY": Decimal(150000)}),
        (" eur = 1000.50 , jpy=150000 ,", {"EUR": Decimal("1000.50"), "JPY": Decimal(150000)}),
        ("", {}),
    ],
)
def test_thresholds_are_read_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, expected: dict[str, Decimal]) -> None:
    monkeypatch.setenv("CHOREO_APPROVAL_THRESHOLDS", raw)
    assert ApprovalSettings(_env_file=None).approval_thresholds == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("EURO=1000", "'EURO' is not an ISO 4217 currency code"),
        ("XXY=1000", "'XXY' is not an ISO 4217 currency code"),
        ("EUR=0", "EUR: the threshold must be above zero, not 0"),
        ("USD=-5", "USD: the threshold must be above zero, not -5"),
        ("EUR=abc", "EUR: 'abc' is not a number"),
        ("EUR=", "EUR: '' is not a number"),
        ("EUR=NaN", "EUR: 'NaN' is not a number"),
        ("EUR=1000,USD=1100,eur=900", "EUR is listed more than once"),
        ("EUR 1000", "'EUR 1000' is not CURRENCY=AMOUNT"),
    ],
)
def test_bad_thresholds_are_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch, raw: str, message: str) -> None:
    monkeypatch.setenv("CHOREO_APPROVAL_THRESHOLDS", raw)
    with pytest.raises(ValidationError, match="approval_thresholds") as refused:
        ApprovalSettings(_env_file=None)
    assert message in str(refused.value)


def test_every_mistake_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_APPROVAL_THRESHOLDS", "EURO=1,USD=0,JPY=x,USD=5")
    with pytest.raises(ValidationError) as refused:
        ApprovalSettings(_env_file=None)
    text = str(refused.value)
    for reason in ("'EURO' is not an ISO", "USD: the threshold must be above zero", "JPY: 'x' is not a number",
                   "USD is listed more than once"):  # fmt: skip
        assert reason in text


def test_thresholds_given_in_code_are_checked_too() -> None:
    assert ApprovalSettings(_env_file=None, approval_thresholds={"JPY": 150000}).approval_thresholds == {
        "JPY": Decimal(150000)
    }
    with pytest.raises(ValidationError, match="'EURO' is not an ISO 4217 currency code"):
        ApprovalSettings(_env_file=None, approval_thresholds={"EURO": Decimal(1)})
