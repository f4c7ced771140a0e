"""`benchmarks.state_codec`: both libraries handle the same document alike, and every figure is printed."""

from __future__ import annotations

import msgspec
import pytest
from pydantic import BaseModel

from benchmarks.state_codec import main, operations
from services.audit.domain import AuditOrderState


def test_each_operation_gives_the_same_document_with_either_library() -> None:
    # A document pydantic wrote reads back as the Struct the other library built: what the audit's
    # changelog, written as models before, relies on.
    for name, (with_pydantic, with_msgspec) in operations().items():
        from_model, from_struct = with_pydantic(), with_msgspec()
        if isinstance(from_struct, bytes):
            assert isinstance(from_model, str)
            read_back = [msgspec.json.decode(document, type=AuditOrderState) for document in (from_model, from_struct)]
            assert read_back[0] == read_back[1], name
            continue
        assert isinstance(from_model, BaseModel), name
        assert msgspec.json.decode(from_model.model_dump_json(), type=type(from_struct)) == from_struct, name


def test_it_prints_a_timing_of_each_library_for_every_operation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--number", "50"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row[:28].strip() for row in rows] == list(operations())
    for row in rows:
        pydantic_us, msgspec_us, ratio = row[28:].split()
        assert float(pydantic_us) > 0
        assert float(msgspec_us) > 0
        assert float(ratio.removesuffix("x")) == pytest.approx(float(pydantic_us) / float(msgspec_us), rel=0.25)
