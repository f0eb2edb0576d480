"""docs/policy-input.schema.json describes what policyd really sends."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema

from policyd.analysis import analyse
from policyd.decision import statement_input
from policyd.lookups import LookupLedger
from tap.hooks import Identity, SessionInfo, StatementRequest

ROOT = Path(__file__).resolve().parent.parent.parent
SCHEMA = json.loads((ROOT / "docs" / "policy-input.schema.json").read_text())


def _corpus() -> list[Any]:
    spec = importlib.util.spec_from_file_location("policy_corpus_for_schema",
                                                  Path(__file__).parent / "test_policy_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return list(module.CORPUS)


def test_schema_is_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_corpus_input_matches_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for entry in _corpus():
        req = StatementRequest(
            identity=Identity(subject="a", groups=("fraud-readers",), actor="b<-c"),
            session=SessionInfo("s", database="shop", upstream_role="fraud_reader"),
            sql=entry.sql, params=entry.params)
        doc = statement_input(req, analyse(req.sql, user="fraud_reader", params=req.params),
                              history=LookupLedger().history(("https://idp", "a")))
        errors = [e.message for e in validator.iter_errors(doc)]
        assert not errors, (entry.sql, errors)
