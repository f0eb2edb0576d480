"""Property: comments, whitespace and identifier/keyword case never hide what
the analysis must see in an always-blocked statement of the corpus.

The statement is re-spelt token by token (pglast's scanner, the server's own
lexer): random case for keywords and unquoted identifiers (PostgreSQL folds
them), random comments and line breaks between tokens. Quoted identifiers,
strings and dollar-quoted bodies are kept as they are.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parser as pg

from policyd.analysis import analyse

GAPS = [" ", "  ", "\n", "\t", " /* x */ ", "/**/", " /* a /* nested */ b */ ", "\n-- c\n"]


def _corpus() -> Any:
    path = Path(__file__).parent / "test_policy_corpus.py"
    spec = importlib.util.spec_from_file_location("policy_corpus_for_evasion", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


corpus = _corpus()
BLOCKED = [c for c in corpus.CORPUS
           if set(c.verdicts.values()) == {"deny"} and "unparseable" not in c.evidence]


def respell(sql: str, data: st.DataObject) -> str:
    raw = sql.encode()
    out: list[bytes] = []
    for token in pg.scan(sql):
        text = raw[token.start:token.end + 1]
        foldable = token.kind != "NO_KEYWORD" or (token.name == "IDENT" and b'"' not in text)
        if foldable and data.draw(st.booleans()):
            text = bytes(c ^ 0x20 if chr(c).isalpha() and data.draw(st.booleans()) else c
                         for c in text)
        out.append(text)
        if text.startswith(b"--"):  # a line comment ends at the line break
            out.append(b"\n")
        out.append(data.draw(st.sampled_from(GAPS)).encode())
    return b"".join(out).decode()


@pytest.mark.parametrize("entry", BLOCKED, ids=lambda c: c.id)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_disguises_do_not_hide_blocked_statements(entry: Any, data: st.DataObject) -> None:
    sql = respell(entry.sql, data)
    analysis = analyse(sql, user="fraud_reader", params=entry.params)
    missing = [e for e in entry.evidence if not corpus.evidence_in(analysis, e)]
    assert not missing, (sql, missing)
