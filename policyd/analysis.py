"""What a SQL message does, in terms a policy can judge.

The SQL is parsed by PostgreSQL's own parser (libpg_query through pglast),
never by regular expressions: comments, case, quoting, ``U&"..."`` escapes and
dollar quoting are undone by the parser exactly as the server would undo them,
so a policy sees ``pg_read_file`` however it was spelt.

Hot path choice: ``pglast.parser.parse_sql_json`` + :func:`json.loads` is
several times faster than ``pglast.parse_sql`` (which builds Python node
objects); see bench/policy_bench.py. The walker therefore works on the plain
JSON tree (dicts, lists, strings).

The result is conservative where the catalog would be needed to be exact:
an unqualified relation lists every schema of the search path it may resolve
to (``candidates``), an unqualified column in a join is attributed to every
table in scope. Over-reporting makes a policy stricter, never looser.
A message the parser rejects is reported ``parseable=False``; the policy
denies it (fail closed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pglast import parser as pg

Node = dict[str, Any]

#: Languages whose functions run arbitrary code in the server process.
UNTRUSTED_LANGUAGES = frozenset(
    {"c", "internal", "plpython3u", "plpythonu", "plpython2u", "plperlu", "pltclu", "plsh",
     "plrustu", "pljavau", "plv8u"}
)

_ROLE_STMTS = {
    "CreateRoleStmt": "create_role",
    "AlterRoleStmt": "alter_role",
    "AlterRoleSetStmt": "alter_role",
    "DropRoleStmt": "drop_role",
    "ReassignOwnedStmt": "reassign_owned",
    "DropOwnedStmt": "drop_owned",
}
_SIMPLE_COMMANDS = {
    "TransactionStmt": "transaction",
    "VariableShowStmt": "show",
    "AlterSystemStmt": "alter_system",
    "DropdbStmt": "drop_database",
    "CreatedbStmt": "create_database",
    "AlterDatabaseStmt": "alter_database",
    "AlterDatabaseSetStmt": "alter_database",
    "GrantStmt": "grant",
    "GrantRoleStmt": "grant",
    "AlterDefaultPrivilegesStmt": "grant",
    "DoStmt": "do",
    "CallStmt": "call",
    "ExecuteStmt": "execute",
    "PrepareStmt": "prepare",
    "DeallocateStmt": "deallocate",
    "ListenStmt": "listen",
    "UnlistenStmt": "listen",
    "NotifyStmt": "notify",
    "DiscardStmt": "discard",
    "LoadStmt": "load",
    "LockStmt": "lock",
    "CheckPointStmt": "maintenance",
    "VacuumStmt": "maintenance",
    "ClusterStmt": "maintenance",
    "ReindexStmt": "maintenance",
    "DeclareCursorStmt": "declare_cursor",
    "FetchStmt": "fetch",
    "ClosePortalStmt": "close",
    "ExplainStmt": "explain",
    "TruncateStmt": "truncate",
    "CreateFunctionStmt": "create_function",
    "CreateExtensionStmt": "ddl",
    "ConstraintsSetStmt": "set",
}
_COMPARISON_OPS = frozenset({"=", "<>", "!=", "<", "<=", ">", ">=", "~~", "!~~", "~~*", "!~~*"})
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "<>": "<>", "!=": "!="}
# Sublinks whose value is the subquery's output (EXISTS/ANY/ALL yield booleans).
_VALUE_SUBLINKS = frozenset({"EXPR_SUBLINK", "ARRAY_SUBLINK", "MULTIEXPR_SUBLINK"})
_CONTAINERS: tuple[type, ...] = (dict, list)
_PAN_LIKE = re.compile(r"(?:\d[ -]?){12,18}\d")


def _looks_like_pan(text: str) -> bool:
    """Luhn-valid 13..19 digits: kept out of the analysis (PCI DSS 3.5.1)."""
    for match in _PAN_LIKE.finditer(text):
        digits = [int(c) for c in match.group() if c.isdigit()]
        if not 13 <= len(digits) <= 19:
            continue
        total = 0
        for i, d in enumerate(reversed(digits)):
            if i % 2:
                d *= 2
                if d > 9:
                    d -= 9
            total += d
        if total % 10 == 0:
            return True
    return False


def scrub_pan(text: str) -> str:
    """Replace digit runs that could be a PAN (13..19 digits) by a marker."""
    return _PAN_LIKE.sub(lambda m: "[redacted]" if _looks_like_pan(m.group()) else m.group(),
                         text)


def parse_search_path(search_path: str) -> list[str]:
    """Split a ``search_path`` setting into schema names (``"$user"`` kept)."""
    names: list[str] = []
    for raw in search_path.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith('"') and item.endswith('"') and len(item) >= 2:
            names.append(item[1:-1].replace('""', '"'))
        else:
            names.append(item.lower())
    return names


@dataclass(slots=True)
class Analysis:
    """The analysis of one protocol message (one or more statements).

    ``statements`` are JSON-ready dicts (the ``input.statements`` array of the
    policy input, documented in docs/policy-input.schema.json).
    """

    sql: str
    parseable: bool
    statements: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    fingerprint: str = ""
    params_used: tuple[int, ...] = ()  # $n referenced anywhere in the message
    # Prepared-statement and portal names this message creates or drops at
    # the SQL level (PREPARE, DEALLOCATE, DECLARE, CLOSE; "*" for all of
    # them): the protocol shares those namespaces, so the tap forgets what
    # it knew under these names.
    statement_names: tuple[str, ...] = ()
    portal_names: tuple[str, ...] = ()

    def bind(self, params: tuple[str | None, ...]) -> Analysis:
        """This analysis with the Bind values placed in its comparisons.

        The SQL of an extended-protocol Parse is analysed once; each Execute
        only binds. ``params_read`` of a statement lists the parameters whose
        value the policy can now see (the decision cache keys on them).
        """
        if not any(c["param"] for s in self.statements for c in s["comparisons"]):
            return self
        statements = []
        for stmt in self.statements:
            if not any(c["param"] for c in stmt["comparisons"]):
                statements.append(stmt)
                continue
            comparisons = []
            read: set[int] = set()
            for c in stmt["comparisons"]:
                n = c["param"]
                if n and 0 < n <= len(params):
                    c = {**c, "value": _param_value(params[n - 1]), "known": True}
                    read.add(n)
                    if _looks_like_pan(str(c["value"])):
                        c["value"] = "[redacted]"
                        c["redacted"] = True
                comparisons.append(c)
            statements.append({**stmt, "comparisons": comparisons, "params_read": sorted(read)})
        return Analysis(sql=self.sql, parseable=self.parseable, statements=statements,
                        error=self.error, fingerprint=self.fingerprint,
                        params_used=self.params_used, statement_names=self.statement_names,
                        portal_names=self.portal_names)

    def to_input(self) -> dict[str, Any]:
        """The ``input.analysis`` document given to the policy."""
        return {
            "parseable": self.parseable,
            "error": self.error,
            "fingerprint": self.fingerprint,
            "statement_count": len(self.statements),
            "statements": self.statements,
            "params_used": list(self.params_used),
        }

    def summary(self) -> dict[str, Any]:
        """A short form for decisions and audit records."""
        names = ({"sql_names": {"statements": list(self.statement_names),
                                "portals": list(self.portal_names)}}
                 if self.statement_names or self.portal_names else {})
        return names | {
            "parseable": self.parseable,
            "error": self.error,
            "fingerprint": self.fingerprint,
            "commands": [s["command"] for s in self.statements],
            "relations": sorted({
                f'{r["schema"]}.{r["name"]}:{r["access"]}'
                for s in self.statements for r in s["relations"]
            }),
            "functions": sorted({
                f'{f["schema"]}.{f["name"]}' for s in self.statements for f in s["functions"]
            }),
            # For the tap: decide again at Bind when the SQL has parameters,
            # and follow search_path changes for later statements.
            "params_used": list(self.params_used),
            "search_path_set": next(
                (list(s.get("search_path") or []) for s in reversed(self.statements)
                 if s.get("setting") == "search_path" and not s.get("is_local")), None),
        }


def analyse(
    sql: str,
    *,
    search_path: str = '"$user", public',
    user: str = "",
    params: tuple[str | None, ...] | None = None,
) -> Analysis:
    """Analyse one message's SQL.

    ``user`` stands for ``"$user"`` in the search path (the role the session
    runs as upstream). ``params`` are Bind values in text form; a comparison
    against ``$n`` then carries the value, and ``params_read`` of the
    statement lists ``n`` so a decision cache can key on exactly those values.
    """
    try:
        tree = json.loads(pg.parse_sql_json(sql))
    except pg.ParseError as exc:
        return Analysis(sql=sql, parseable=False,
                        error=f"unparseable SQL: {scrub_pan(str(exc))}")
    except Exception as exc:  # libpg_query refusing input we cannot even hand it
        return Analysis(sql=sql, parseable=False,
                        error=f"unparseable SQL: {type(exc).__name__}")
    try:
        fingerprint = pg.fingerprint(sql)
    except Exception:
        fingerprint = ""
    ctx = _Message(parse_search_path(search_path), user)
    statements = [ctx.statement(raw) for raw in tree.get("stmts", [])]
    result = Analysis(sql=sql, parseable=True, statements=statements, fingerprint=fingerprint,
                      params_used=tuple(sorted(ctx.params_used)),
                      statement_names=tuple(sorted(ctx.statement_names)),
                      portal_names=tuple(sorted(ctx.portal_names)))
    return result if params is None else result.bind(params)


def _strings(items: list[Node] | None) -> list[str]:
    return [i["String"]["sval"] for i in items or () if "String" in i]


def _const_value(node: Node) -> tuple[bool, Any]:
    """(known, value) of an A_Const, through type casts."""
    while "TypeCast" in node:
        node = node["TypeCast"].get("arg", {})
    if "A_Const" not in node:
        return False, None
    const = node["A_Const"]
    if const.get("isnull"):
        return True, None
    if "ival" in const:
        return True, const["ival"].get("ival", 0)
    if "fval" in const:
        text = const["fval"].get("fval", "0")
        try:
            return True, float(text) if not text.isdigit() else int(text)
        except ValueError:
            return True, text
    if "sval" in const:
        return True, const["sval"].get("sval", "")
    if "boolval" in const:
        return True, bool(const["boolval"].get("boolval", False))
    if "bsval" in const:
        return True, const["bsval"].get("bsval", "")
    return False, None


def _param_value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


# (schema shown, name, access, candidates): one entry of _Statement.relations
_Key = tuple[str, str, str, tuple[str, ...]]


@dataclass(slots=True)
class _Table:
    key: _Key
    candidates: list[str]  # "schema.name" the name may resolve to
    # Column names given by the alias (`payments AS p(i, c)`): which of the
    # table's columns they stand for is in the catalog, not here, so a
    # reference to one is a reference to any (`schema.table.*`).
    renamed: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Derived:
    columns: list[tuple[str, frozenset[str]]]  # output name -> source columns
    # Output names computed by an expression (translate(card_number, ...) AS
    # t): a query over the derived table that selects t returns a computed
    # value, however plainly it names it; PostgreSQL gives it no column
    # identity either (RowDescription's table OID 0). The value is COMPUTED
    # or RESHAPED (see _KEEPS_DIGITS).
    computed: dict[str, int] = field(default_factory=dict)

    def lookup(self, name: str) -> frozenset[str] | None:
        for col, sources in self.columns:
            if col == name:
                return sources
        for col, sources in self.columns:
            if col == "*":  # `(SELECT * FROM payments) x`: x.card_number is payments'
                return frozenset(f"{src[:-1]}{name}" for src in sources if src.endswith(".*"))
        return None

    def all_sources(self) -> frozenset[str]:
        out: set[str] = set()
        for _, sources in self.columns:
            out |= sources
        return frozenset(out)


@dataclass(slots=True)
class _Scope:
    parent: _Scope | None = None
    level: int = 0  # which SELECT level a comparison belongs to
    entries: list[tuple[str, _Table | _Derived]] = field(default_factory=list)
    ctes: dict[str, _Derived] = field(default_factory=dict)
    referenced: set[int] = field(default_factory=set)  # id() of the _Table a WHERE used

    def find_cte(self, name: str) -> _Derived | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return scope.ctes[name]
            scope = scope.parent
        return None


_NAME_STMTS = frozenset({"PrepareStmt", "DeallocateStmt", "DeclareCursorStmt",
                         "ClosePortalStmt", "DiscardStmt"})


class _Message:
    """State shared by the statements of one message (search_path, PREPAREs)."""

    def __init__(self, search_path: list[str], user: str) -> None:
        self.search_path = search_path
        self.user = user
        self.params_used: set[int] = set()
        self.prepared: set[str] = set()  # PREPAREd earlier in this message
        self.statement_names: set[str] = set()  # see Analysis.statement_names
        self.portal_names: set[str] = set()

    def names_changed(self, kind: str, body: Node) -> None:
        """Note the SQL-level statement and portal names a statement creates
        or drops ("*": all of them)."""
        if kind == "PrepareStmt":
            self.statement_names.add(body.get("name", ""))
        elif kind == "DeallocateStmt":
            self.statement_names.add("*" if body.get("isall") else body.get("name", ""))
        elif kind == "DeclareCursorStmt":
            self.portal_names.add(body.get("portalname", ""))
        elif kind == "ClosePortalStmt":
            self.portal_names.add(body.get("portalname") or "*")
        elif kind == "DiscardStmt" and body.get("target") == "DISCARD_ALL":
            self.statement_names.add("*")
            self.portal_names.add("*")

    def statement(self, raw: Node) -> dict[str, Any]:
        return _Statement(self).run(raw.get("stmt", {}))


class _Statement:
    """Walks one statement's JSON tree and collects what the policy needs."""

    def __init__(self, msg: _Message) -> None:
        self.msg = msg
        self.command = "unknown"
        self.node_type = ""
        self.relations: dict[_Key, dict[str, Any]] = {}
        self.functions: dict[tuple[str, str], dict[str, Any]] = {}
        self.comparisons: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []
        self.flags: dict[str, Any] = {
            "data_modifying_cte": False,
            "select_into": False,
            "dynamic_sql": False,
            "opaque_sql": False,
            "set_role": False,
            "session_authorization": False,
            "alter_system": False,
            "role_statement": False,
            "grant": False,
            "drop_database": False,
            "untrusted_language": False,
            "transaction_control": False,
        }
        self.details: dict[str, Any] = {}
        self.limited = False
        self.levels = 0
        self.unbounded_reads: set[_Key] = set()
        # The last (sub)query's computed outputs, name -> COMPUTED or
        # RESHAPED (set by _select and _dml for the derived table a caller
        # builds from them), and the most of either an expression being
        # walked came through (_expr_into, _column).
        self.computed_out: dict[str, int] = {}
        self.shape = PLAIN

    # -- entry ---------------------------------------------------------------
    def run(self, stmt: Node) -> dict[str, Any]:
        if not stmt:
            self.command = "empty"
        else:
            (self.node_type, body), = stmt.items()
            self._dispatch(self.node_type, body, _Scope(), top=True)
        relations = []
        for key, rel in self.relations.items():
            out = dict(rel)
            out["columns"] = sorted(rel["columns"])
            out["bounded"] = key not in self.unbounded_reads
            relations.append(out)
        return {
            "command": self.command,
            "node": self.node_type,
            "relations": relations,
            "functions": list(self.functions.values()),
            "comparisons": self.comparisons,
            "outputs": self.outputs,
            "bounded": not any(
                k[2] == "read" for k in self.unbounded_reads if k in self.relations),
            "limited": self.limited,
            "params_read": [],
            **self.flags,
            **self.details,
        }

    def _dispatch(self, kind: str, body: Node, scope: _Scope, *, top: bool,
                  emit: bool | None = None) -> list[tuple[str, frozenset[str]]]:
        """Handle one statement node; returns its output columns (lineage).

        ``top``: the statement itself (sets the command); ``emit``: its result
        columns reach the client (defaults to ``top``).
        """
        emit = top if emit is None else emit
        self.computed_out = {}
        if kind in _NAME_STMTS:
            self.msg.names_changed(kind, body)
        if kind == "SelectStmt":
            if top:
                self.command = "select"
            into = body.get("intoClause")
            cols = self._select(body, scope, top=emit and not into)
            if into:
                self.flags["select_into"] = True
                if top:
                    self.command = "select_into"
                self._relation(into.get("rel", {}), "write")
                return []
            return cols
        if kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            if top:
                self.command = kind[: -len("Stmt")].lower()
            return self._dml(kind, body, scope, emit=emit)
        if top:
            self.command = self._command_for(kind, body)
        if kind in _ROLE_STMTS:
            self.flags["role_statement"] = True
            self.details["role_action"] = _ROLE_STMTS[kind]
        elif kind == "RenameStmt" and body.get("renameType") == "OBJECT_ROLE":
            self.flags["role_statement"] = True
            self.details["role_action"] = "rename_role"
        elif kind in ("GrantStmt", "GrantRoleStmt", "AlterDefaultPrivilegesStmt"):
            self.flags["grant"] = True
            self.details["grant_is_grant"] = bool(body.get("is_grant", False))
        elif kind == "DropdbStmt":
            self.flags["drop_database"] = True
            self.details["database"] = body.get("dbname", "")
        elif kind == "AlterSystemStmt":
            self.flags["alter_system"] = True
        elif kind == "TransactionStmt":
            self.flags["transaction_control"] = True
            self.details["transaction"] = body.get("kind", "").removeprefix(
                "TRANS_STMT_").lower()
        elif kind == "VariableSetStmt":
            self._set(body)
            return []
        elif kind == "CopyStmt":
            return self._copy(body, scope)
        elif kind == "DoStmt":
            self.flags["dynamic_sql"] = True
            lang = "plpgsql"
            code = ""
            for opt in body.get("args", []):
                d = opt.get("DefElem", {})
                if d.get("defname") == "language":
                    lang = d.get("arg", {}).get("String", {}).get("sval", lang)
                elif d.get("defname") == "as":
                    code = d.get("arg", {}).get("String", {}).get("sval", "")
            self.details["language"] = lang.lower()
            if lang.lower() in UNTRUSTED_LANGUAGES:
                self.flags["untrusted_language"] = True
            self._body(lang.lower(), code, scope)
            return []
        elif kind == "CreateFunctionStmt":
            self._create_function(body, scope)
            return []
        elif kind == "CallStmt":
            call = body.get("funccall", {})
            self._expr({"FuncCall": call}, scope)
            return []
        elif kind == "PrepareStmt":
            name = body.get("name", "")
            query = body.get("query", {})
            self.details["prepared_name"] = name
            if query:
                (qkind, qbody), = query.items()
                # Its outputs are what an EXECUTE of it returns.
                self._dispatch(qkind, qbody, scope, top=False, emit=emit)
                self.details["prepared_command"] = self._command_for(qkind, qbody)
            self.msg.prepared.add(name)
            return []
        elif kind == "ExecuteStmt":
            name = body.get("name", "")
            self.details["prepared_name"] = name
            for p in body.get("params", []):
                self._expr(p, scope)
            if name not in self.msg.prepared:
                # The text was prepared by an earlier message: this statement
                # alone does not say what runs.
                self.flags["opaque_sql"] = True
            return []
        elif kind == "ExplainStmt":
            inner = body.get("query", {})
            analyze = any(o.get("DefElem", {}).get("defname") == "analyze"
                          for o in body.get("options", []))
            self.details["explain_analyze"] = analyze
            if inner:
                (ikind, ibody), = inner.items()
                self._dispatch(ikind, ibody, scope, top=False)
                self.details["explained_command"] = self._command_for(ikind, ibody)
            return []
        elif kind == "DeclareCursorStmt":
            inner = body.get("query", {})
            if inner:
                (ikind, ibody), = inner.items()
                # Its outputs are what a FETCH from the cursor returns.
                return self._dispatch(ikind, ibody, scope, top=False, emit=emit)
            return []
        elif kind == "CreateTableAsStmt":
            inner = body.get("query", {})
            if inner:
                (ikind, ibody), = inner.items()
                self._dispatch(ikind, ibody, scope, top=False)
            self._relation(body.get("into", {}).get("rel", {}), "ddl")
            return []
        elif kind == "ViewStmt":
            inner = body.get("query", {})
            if inner:
                (ikind, ibody), = inner.items()
                self._dispatch(ikind, ibody, scope, top=False)
            self._relation(body.get("view", {}), "ddl")
            return []
        elif kind == "TruncateStmt":
            for rel in body.get("relations", []):
                self._relation(rel.get("RangeVar", {}), "write")
            return []
        elif kind == "DropStmt":
            self._drop(body)
            return []
        # Everything else: any relation named is touched as DDL, any function
        # or expression walked for calls.
        self._generic(body, scope, "lock" if kind == "LockStmt" else "ddl")
        return []

    @staticmethod
    def _command_for(kind: str, body: Node) -> str:
        if kind == "SelectStmt":
            return "select_into" if body.get("intoClause") else "select"
        if kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            return kind[: -len("Stmt")].lower()
        if kind in _SIMPLE_COMMANDS:
            return _SIMPLE_COMMANDS[kind]
        if kind in _ROLE_STMTS:
            return "role"
        if kind == "VariableSetStmt":
            return "set"
        if kind == "CopyStmt":
            return "copy"
        if kind == "RenameStmt" and body.get("renameType") == "OBJECT_ROLE":
            return "role"
        if kind.startswith(("Create", "Alter", "Drop", "Rename", "Comment", "Define",
                            "Composite", "Index", "View", "Rule", "SecLabel", "Import",
                            "Reassign", "Refresh")):
            return "ddl"
        return "utility"

    # -- statements ----------------------------------------------------------
    def _scope(self, parent: _Scope) -> _Scope:
        self.levels += 1
        return _Scope(parent=parent, level=self.levels)

    def _select(self, body: Node, outer: _Scope, *, top: bool) -> list[
            tuple[str, frozenset[str]]]:
        op = body.get("op", "SETOP_NONE")
        scope = self._scope(outer)
        entry_shape = self.shape  # FROM and WHERE do not shape what is returned
        self._with(body.get("withClause"), scope)
        if op != "SETOP_NONE":
            left = self._select(body.get("larg", {}), scope, top=False)
            lshape = self.computed_out
            right = self._select(body.get("rarg", {}), scope, top=False)
            rshape = self.computed_out
            cols = [(name, lsrc | (right[i][1] if i < len(right) else frozenset()))
                    for i, (name, lsrc) in enumerate(left)]
            # UNION/INTERSECT/EXCEPT compare rows (and sort them together):
            # with chosen values on one side, a question about the other's
            found = set(self.details.get("set_operation_sources", []))
            for _, src in (*left, *right):
                found |= src
            self.details["set_operation_sources"] = sorted(found)
            # A set operation's outputs have no column identity.
            shapes = [max(COMPUTED if src else PLAIN, lshape.get(name, PLAIN),
                          rshape.get(right[i][0], PLAIN) if i < len(right) else PLAIN)
                      for i, (name, src) in enumerate(cols)]
            self._limit(body, scope)
            if top:
                self._emit_outputs(cols, exprs=None, shapes=shapes)
            self.computed_out = {n: sh for (n, src), sh in zip(cols, shapes, strict=True) if src}
            return cols
        if "valuesLists" in body:
            cols = []
            value_shapes: list[int] = []
            for row in body["valuesLists"]:
                for i, item in enumerate(row.get("List", {}).get("items", [])):
                    src, shape = self._shaped(item, scope)
                    if i < len(cols):
                        cols[i] = (cols[i][0], cols[i][1] | src)
                        value_shapes[i] = max(value_shapes[i], shape)
                    else:
                        cols.append((f"column{i + 1}", src))
                        value_shapes.append(shape)
            self.computed_out = {n: max(sh, COMPUTED)
                                 for (n, src), sh in zip(cols, value_shapes, strict=True) if src}
            return cols
        for item in body.get("fromClause", []):
            self._from(item, scope)
        reads_here = [e for _, e in scope.entries if isinstance(e, _Table)]
        if "whereClause" in body:
            self._where(body["whereClause"], scope)
        for clause in ("groupClause", "havingClause", "sortClause", "distinctClause",
                       "windowClause", "lockingClause"):
            if clause in body:
                self._generic(body[clause], scope, "read")
        if "havingClause" in body:
            # HAVING max(card_number) > '4': a condition like a WHERE's, on
            # groups; it bounds no read
            self._comparisons(body["havingClause"], scope, negated=False, disjunctive=True)
        for clause in ("groupClause", "sortClause", "distinctClause", "windowClause"):
            # ORDER BY a column orders rows; ORDER BY an expression of it
            # (with LIMIT) answers a question about its value: recorded
            self._key_refs(body.get(clause), scope)
        limited = self._limit(body, scope)
        for table in reads_here:
            if not limited and id(table) not in scope.referenced:
                self.unbounded_reads.add(table.key)
        self.shape = entry_shape
        cols, kinds, shapes = self._targets(body.get("targetList", []), scope)
        if top:
            self._emit_outputs(cols, exprs=kinds, shapes=shapes)
        self.computed_out = _computed(cols, kinds, shapes)
        return cols

    def _limit(self, body: Node, scope: _Scope) -> bool:
        count = body.get("limitCount")
        if count is None:
            return False
        known, value = _const_value(count)
        self._expr(count, scope)
        if known and value is None:  # LIMIT ALL / LIMIT NULL
            return False
        self.limited = True
        if known:
            self.details["limit"] = value
        return True

    def _emit_outputs(self, cols: list[tuple[str, frozenset[str]]],
                      exprs: list[str] | None, shapes: list[int] | None = None) -> None:
        for i, (name, sources) in enumerate(cols):
            kind = exprs[i] if exprs is not None and i < len(exprs) else (
                "expression" if sources else "constant")
            reshaped = shapes is not None and i < len(shapes) and shapes[i] == RESHAPED
            self.outputs.append({"position": i, "name": name, "sources": sorted(sources),
                                 "kind": kind, "reshaped": bool(reshaped and sources)})

    def _shaped(self, node: Any, scope: _Scope) -> tuple[frozenset[str], int]:
        """Sources of an expression and the most it changed them (PLAIN,
        COMPUTED, RESHAPED); an enclosing expression's shape keeps it."""
        outer, self.shape = self.shape, PLAIN
        sources = self._expr(node, scope)
        shape = self.shape
        self.shape = max(outer, shape)
        return sources, shape

    def _targets(self, targets: list[Node], scope: _Scope) -> tuple[
            list[tuple[str, frozenset[str]]], list[str], list[int]]:
        cols: list[tuple[str, frozenset[str]]] = []
        kinds: list[str] = []
        shapes: list[int] = []
        for t in targets:
            rt = t.get("ResTarget", {})
            val = rt.get("val", {})
            ref = val.get("ColumnRef")
            if ref is not None and "A_Star" in ref["fields"][-1]:
                for name, src, shape in self._star(ref["fields"], scope):
                    cols.append((name, src))
                    kinds.append("expression" if shape else "star" if name == "*"
                                 else "column")
                    shapes.append(shape)
                continue
            sources, shape = self._shaped(val, scope)
            name = rt.get("name") or self._default_name(val)
            cols.append((name, sources))
            shapes.append(shape)
            if ref is not None:
                kinds.append("expression" if shape and sources else "column")
            else:
                kinds.append("expression" if sources else "constant")
        return cols, kinds, shapes

    @staticmethod
    def _default_name(val: Node) -> str:
        if "ColumnRef" in val:
            names = _strings(val["ColumnRef"]["fields"])
            return names[-1] if names else "?column?"
        if "FuncCall" in val:
            names = _strings(val["FuncCall"].get("funcname"))
            return names[-1] if names else "?column?"
        if "TypeCast" in val:
            return _Statement._default_name(val["TypeCast"].get("arg", {}))
        return "?column?"

    def _star(self, fields: list[Node], scope: _Scope
              ) -> list[tuple[str, frozenset[str], int]]:
        """(name, sources, shape) of each column a `*` stands for."""
        qual = _strings(fields[:-1])
        out: list[tuple[str, frozenset[str], int]] = []
        for _, entry in self._visible(scope, qual[-1] if qual else None):
            if isinstance(entry, _Table):
                self.relations[entry.key]["columns"].add("*")
                out.append(("*", frozenset(f"{c}.*" for c in entry.candidates), PLAIN))
            else:
                out.extend((n, src, entry.computed.get(n, PLAIN)) for n, src in entry.columns)
        return out

    def _visible(self, scope: _Scope, alias: str | None) -> list[tuple[str, _Table | _Derived]]:
        s: _Scope | None = scope
        while s is not None:
            if alias is None:
                if s.entries:
                    return list(s.entries)
            else:
                found = [(a, e) for a, e in s.entries if a == alias]
                if found:
                    return found
            s = s.parent
        return []

    def _dml(self, kind: str, body: Node, outer: _Scope, *, emit: bool) -> list[
            tuple[str, frozenset[str]]]:
        scope = self._scope(outer)
        self._with(body.get("withClause"), scope)
        rel = body.get("relation", {})
        target = self._relation(rel, "write")
        alias = rel.get("alias", {}).get("aliasname") or rel.get("relname", "")
        if kind == "InsertStmt":
            for col in body.get("cols", []):
                name = col.get("ResTarget", {}).get("name")
                if name and target is not None:
                    self.relations[target.key]["columns"].add(name)
            sel = body.get("selectStmt")
            if sel:
                (skind, sbody), = sel.items()
                self._dispatch(skind, sbody, scope, top=False)
            conflict = body.get("onConflictClause")
            if target is not None:
                scope.entries.append((alias, target))
            if conflict:
                # DO UPDATE reads the existing row (its SET and WHERE may
                # name any of its columns); DO NOTHING reads nothing back.
                action = conflict.get("action", "")
                self.details["on_conflict"] = ("update" if action == "ONCONFLICT_UPDATE"
                                               else "nothing")
                self._generic(conflict, scope, "read")
        else:
            if target is not None:
                scope.entries.append((alias, target))
            for item in body.get("fromClause", []) + body.get("usingClause", []):
                self._from(item, scope)
            if kind == "MergeStmt" and body.get("sourceRelation"):
                self._from(body["sourceRelation"], scope)
                self._where(body.get("joinCondition", {}), scope)
            if kind == "UpdateStmt" and target is not None:
                for t in body.get("targetList", []):
                    name = t.get("ResTarget", {}).get("name")
                    if name:
                        self.relations[target.key]["columns"].add(name)
                    self._expr(t.get("ResTarget", {}).get("val", {}), scope)
            if "whereClause" in body:
                self._where(body["whereClause"], scope)
            elif kind in ("UpdateStmt", "DeleteStmt") and target is not None:
                self.unbounded_reads.add(target.key)
            if kind == "MergeStmt":
                self._generic(body.get("mergeWhenClauses", []), scope, "read")
        if body.get("returningList") or body.get("returningClause"):
            rl = body.get("returningList") or body.get("returningClause", {}).get("exprs", [])
            self.shape = PLAIN
            cols, kinds, shapes = self._targets(rl, scope)
            if emit:
                self._emit_outputs(cols, exprs=kinds, shapes=shapes)
            self.computed_out = _computed(cols, kinds, shapes)
            return cols
        return []

    def _with(self, with_clause: Node | None, scope: _Scope) -> None:
        if not with_clause:
            return
        for cte in with_clause.get("ctes", []):
            c = cte.get("CommonTableExpr", {})
            query = c.get("ctequery", {})
            if not query:
                continue
            (qkind, qbody), = query.items()
            if qkind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
                self.flags["data_modifying_cte"] = True
            cols = self._dispatch(qkind, qbody, scope, top=False)
            computed = self.computed_out
            aliases = _strings(c.get("aliascolnames"))
            if aliases:
                cols, computed = _renamed(cols, computed, aliases)
            scope.ctes[c.get("ctename", "")] = _Derived(cols, computed)

    def _from(self, item: Node, scope: _Scope) -> None:
        if "RangeVar" in item:
            rv = item["RangeVar"]
            name = rv.get("relname", "")
            alias = rv.get("alias", {}).get("aliasname") or name
            if not rv.get("schemaname"):
                cte = scope.find_cte(name)
                if cte is not None:
                    scope.entries.append((alias, cte))
                    return
            table = self._relation(rv, "read")
            if table is not None:
                renamed = _strings(rv.get("alias", {}).get("colnames"))
                if renamed:
                    table = _Table(table.key, table.candidates, frozenset(renamed))
                scope.entries.append((alias, table))
        elif "JoinExpr" in item:
            j = item["JoinExpr"]
            self._from(j.get("larg", {}), scope)
            self._from(j.get("rarg", {}), scope)
            if "quals" in j:
                self._expr(j["quals"], scope)
                # A join condition filters rows like a WHERE (and answers
                # the same questions), but on an outer join it bounds
                # nothing: its terms are disjunctive.
                self._comparisons(j["quals"], scope, negated=False, disjunctive=True)
            for name in _strings(j.get("usingClause")):
                # USING (c): both sides' c, compared; which side holds what
                # is not known here, so each is a reference of unknown use.
                self._comparison({"ColumnRef": {"fields": [{"String": {"sval": name}}]}},
                                 "ref", {}, scope, True, True)
            if j.get("isNatural"):
                # NATURAL: every column the two sides share, unknown here.
                for _, entry in scope.entries:
                    for whole in (sorted(f"{c}.*" for c in entry.candidates)
                                  if isinstance(entry, _Table) else sorted(entry.all_sources())):
                        self.comparisons.append({
                            "column": "*", "sources": [whole], "op": "ref", "negated": True,
                            "disjunctive": True, "level": scope.level, "param": None,
                            "value": None, "known": False})
        elif "RangeSubselect" in item:
            rs = item["RangeSubselect"]
            sub = rs.get("subquery", {})
            (skind, sbody), = sub.items()
            cols = self._dispatch(skind, sbody, scope, top=False)
            computed = self.computed_out
            alias = rs.get("alias", {})
            names = _strings(alias.get("colnames"))
            if names:
                cols, computed = _renamed(cols, computed, names)
            scope.entries.append((alias.get("aliasname", ""), _Derived(cols, computed)))
        elif "RangeFunction" in item:
            rf = item["RangeFunction"]
            sources: set[str] = set()
            shape = PLAIN
            for f in rf.get("functions", []):
                for part in f.get("List", {}).get("items", []):
                    src, part_shape = self._shaped(part, scope)
                    sources |= src
                    shape = max(shape, part_shape)
            alias = rf.get("alias", {})
            name = alias.get("aliasname", "")
            # What a function returns is computed from its arguments.
            scope.entries.append((name, _Derived([(name, frozenset(sources))],
                                                 {name: max(shape, COMPUTED)} if sources
                                                 else {})))
        else:
            self._generic(item, scope, "read")

    def _where(self, where: Node, scope: _Scope) -> None:
        self._comparisons(where, scope, negated=False, disjunctive=False)
        self._expr(where, scope, record_refs=True)

    def _relation(self, rv: Node, access: str) -> _Table | None:
        name = rv.get("relname")
        if not name:
            return None
        schema = rv.get("schemaname")
        catalog = rv.get("catalogname")
        if schema:
            candidates = [f"{schema}.{name}"]
            qualified = True
        else:
            candidates = [f"{s}.{name}" for s in self._path_for(name)]
            qualified = False
        # The schema shown is PostgreSQL's first try, skipping a "$user"
        # schema when others follow (few deployments create one); every
        # candidate stays listed for the policy.
        shown = [c for c in candidates if c.rsplit(".", 1)[0] != self.msg.user] or candidates
        first_schema = shown[0].rsplit(".", 1)[0] if shown else "public"
        # Distinct candidate lists are distinct relations: `evil.payments` and an
        # unqualified `payments` that may also be public.payments never merge.
        key = (first_schema, name, access, tuple(candidates))
        if key not in self.relations:
            entry: dict[str, Any] = {
                "schema": first_schema, "name": name, "access": access,
                "qualified": qualified, "candidates": candidates, "columns": set(),
            }
            if catalog:
                entry["database"] = catalog
            self.relations[key] = entry
        return _Table(key, candidates)

    def _path_for(self, name: str) -> list[str]:
        """Schemas an unqualified name may resolve to, in PostgreSQL's order.

        pg_catalog is searched first unless the path names it later; it is
        left out for names not starting with ``pg_`` because every system
        catalog and view does, and creating others there needs superuser.
        """
        path = [self.msg.user if s == "$user" else s for s in self.msg.search_path]
        path = [s for s in path if s]
        if "pg_catalog" not in path:
            path = ["pg_catalog", *path]
        if not name.startswith("pg_"):
            path = [s for s in path if s != "pg_catalog"]
        return path or ["public"]

    # -- special statements --------------------------------------------------
    def _set(self, body: Node) -> None:
        name = (body.get("name") or "").lower()
        kind = body.get("kind", "")
        self.details["setting"] = name
        self.details["is_local"] = bool(body.get("is_local", False))
        if name == "role":
            self.flags["set_role"] = True
        elif name == "session_authorization":
            self.flags["session_authorization"] = True
        if name == "search_path" and kind == "VAR_SET_VALUE":
            values: list[str] = []
            for arg in body.get("args", []):
                known, value = _const_value(arg)
                if known and isinstance(value, str):
                    values.append(value)
            if values:
                self.msg.search_path = values
                self.details["search_path"] = values
        elif name == "search_path" and kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
            self.msg.search_path = ["$user", "public"]

    def _copy(self, body: Node, scope: _Scope) -> list[tuple[str, frozenset[str]]]:
        is_from = bool(body.get("is_from", False))
        self.details["copy_direction"] = "from" if is_from else "to"
        self.details["copy_program"] = bool(body.get("is_program", False))
        filename = body.get("filename")
        self.details["copy_filename"] = filename
        self.details["copy_stdio"] = filename is None
        # FORMAT text (the default), csv or binary; the old `BINARY` and
        # `CSV` keywords come as the same option. PostgreSQL refuses a
        # second FORMAT, so "binary" anywhere is what it will use.
        fmt = "text"
        for opt in body.get("options", []):
            d = opt.get("DefElem", {})
            if d.get("defname") == "format":
                value = str(d.get("arg", {}).get("String", {}).get("sval", "")).lower()
                if value == "binary" or fmt != "binary":
                    fmt = value or fmt
        self.details["copy_format"] = fmt
        if body.get("relation"):
            t = self._relation(body["relation"], "write" if is_from else "read")
            if t is not None:
                for a in body.get("attlist", []):
                    name = a.get("String", {}).get("sval")
                    if name:
                        self.relations[t.key]["columns"].add(name)
                if not body.get("attlist"):
                    self.relations[t.key]["columns"].add("*")
                if not is_from:
                    self.unbounded_reads.add(t.key)
                    self._emit_outputs([("*", frozenset(f"{c}.*" for c in t.candidates))],
                                       exprs=["star"])
        if body.get("query"):
            (qkind, qbody), = body["query"].items()
            self._dispatch(qkind, qbody, scope, top=False, emit=not is_from)
        if body.get("whereClause"):
            self._where(body["whereClause"], scope)
        return []

    def _create_function(self, body: Node, scope: _Scope) -> None:
        lang = "sql"
        code = ""
        for opt in body.get("options", []):
            d = opt.get("DefElem", {})
            if d.get("defname") == "language":
                lang = d.get("arg", {}).get("String", {}).get("sval", lang)
            elif d.get("defname") == "as":
                parts = _strings(d.get("arg", {}).get("List", {}).get("items"))
                code = parts[0] if parts else ""
        lang = lang.lower()
        self.details["language"] = lang
        self.details["function_name"] = ".".join(_strings(body.get("funcname")))
        if lang in UNTRUSTED_LANGUAGES:
            self.flags["untrusted_language"] = True
        if body.get("sql_body"):
            self._generic(body["sql_body"], scope, "read")
        else:
            self._body(lang, code, scope)

    def _body(self, lang: str, code: str, scope: _Scope) -> None:
        """Look into a function or DO body for what it would call.

        A body we cannot see through is flagged ``opaque_sql`` so a policy can
        refuse it; PL/pgSQL ``EXECUTE`` is dynamic SQL.
        """
        if lang == "sql":
            try:
                tree = json.loads(pg.parse_sql_json(code))
            except Exception:
                self.flags["opaque_sql"] = True
                return
            for raw in tree.get("stmts", []):
                (k, b), = raw.get("stmt", {}).items()
                self._dispatch(k, b, scope, top=False)
            return
        if lang != "plpgsql":
            self.flags["opaque_sql"] = True
            return
        quoted = "'" + code.replace("'", "''") + "'"
        wrapper = f"CREATE FUNCTION pgwarden_body() RETURNS void LANGUAGE plpgsql AS {quoted}"
        try:
            tree = json.loads(pg.parse_plpgsql_json(wrapper))
        except Exception:
            self.flags["opaque_sql"] = True
            return
        for key, value in _walk_items(tree):
            if key == "PLpgSQL_stmt_dynexecute" or key == "PLpgSQL_stmt_dynfors":
                self.flags["dynamic_sql"] = True
            if key == "query" and isinstance(value, str):
                self._fragment(value, scope)

    def _fragment(self, query: str, scope: _Scope) -> None:
        for text in (query, f"SELECT {query}", "SELECT " + query.split(":=", 1)[-1]):
            try:
                tree = json.loads(pg.parse_sql_json(text))
            except Exception:  # noqa: S112 - the next wrapping may parse; else opaque
                continue
            for raw in tree.get("stmts", []):
                (k, b), = raw.get("stmt", {}).items()
                self._dispatch(k, b, scope, top=False)
            return
        self.flags["opaque_sql"] = True

    def _drop(self, body: Node) -> None:
        objtype = body.get("removeType", "")
        self.details["object_type"] = objtype.removeprefix("OBJECT_").lower()
        if objtype in ("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_SEQUENCE",
                       "OBJECT_FOREIGN_TABLE", "OBJECT_INDEX"):
            for obj in body.get("objects", []):
                names = _strings(obj.get("List", {}).get("items"))
                if not names:
                    continue
                rv: Node = {"relname": names[-1]}
                if len(names) > 1:
                    rv["schemaname"] = names[-2]
                self._relation(rv, "ddl")

    # -- expressions ---------------------------------------------------------
    def _generic(self, node: Any, scope: _Scope, access: str) -> None:
        """Walk an arbitrary subtree: RangeVars are relations, SelectStmts are
        subqueries, FuncCalls are functions."""
        if isinstance(node, list):
            for item in node:
                self._generic(item, scope, access)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key == "RangeVar" and isinstance(value, dict):
                self._relation(value, access)
            elif key.endswith("Stmt") and isinstance(value, dict):
                # Statements inside statements (CREATE SCHEMA ... GRANT,
                # CREATE RULE ... DO INSTEAD DELETE): flagged like top-level ones.
                if key in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
                    self.flags["data_modifying_cte"] = (
                        self.flags["data_modifying_cte"] or self.command == "select")
                self._dispatch(key, value, scope, top=False)
            elif key in ("FuncCall", "ColumnRef", "SubLink", "ParamRef"):
                self._expr({key: value}, scope)
            else:
                self._generic(value, scope, access)

    def _expr(self, node: Any, scope: _Scope, *, record_refs: bool = False) -> frozenset[str]:
        """Source columns an expression derives from; records functions."""
        out: set[str] = set()
        self._expr_into(node, scope, out, record_refs)
        return frozenset(out)

    def _expr_into(self, node: Any, scope: _Scope, out: set[str], record_refs: bool) -> None:
        if isinstance(node, list):
            for item in node:
                self._expr_into(item, scope, out, record_refs)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if type(value) not in _CONTAINERS:
                continue  # locations, flags, names: most keys of a node
            if key == "ColumnRef":
                out |= self._column(value["fields"], scope, record_refs)
            elif key == "FuncCall":
                names = _strings(value.get("funcname"))
                if not _keeps_digits(names):
                    self.shape = RESHAPED
                self._function(names, value, scope)
                for part in ("args", "agg_order", "agg_filter", "over"):
                    if part in value:
                        self._expr_into(value[part], scope, out, record_refs)
            elif key == "SubLink":
                sub = value.get("subselect", {})
                if "testexpr" in value:
                    self._expr_into(value["testexpr"], scope, out, record_refs)
                if sub:
                    (skind, sbody), = sub.items()
                    cols = self._dispatch(skind, sbody, scope, top=False)
                    if value.get("subLinkType") in _VALUE_SUBLINKS:
                        for _, src in cols:
                            out |= src
            elif key == "ParamRef":
                self._param(value.get("number", 0))
            elif key in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt"):
                cols = self._dispatch(key, value, scope, top=False)
                for _, src in cols:
                    out |= src
            elif key == "RangeVar":
                self._relation(value, "read")
            else:
                if key == "A_Expr" and _strings(value.get("name")) != ["||"]:
                    # Arithmetic, comparisons, LIKE ...: not the digits as
                    # they were (concatenation keeps them).
                    self.shape = RESHAPED
                elif key == "TypeCast" and not _cast_keeps_digits(value.get("typeName", {})):
                    # varchar(12) keeps 12 digits, money groups them by 3.
                    self.shape = RESHAPED
                self._expr_into(value, scope, out, record_refs)

    def _param(self, number: int) -> None:
        self.msg.params_used.add(number)

    def _column(self, fields: list[Node], scope: _Scope, record_refs: bool) -> set[str]:
        if fields and "A_Star" in fields[-1]:
            out: set[str] = set()
            for _, src, shape in self._star(fields, scope):
                out |= src
                self.shape = max(self.shape, shape)
            return out
        names = _strings(fields)
        if not names:
            return set()
        col = names[-1]
        alias = names[-2] if len(names) >= 2 else None
        if len(names) >= 3:
            # schema.table.column: a table named in FROM under its own name.
            alias = names[-2]
        sources: set[str] = set()
        entries = self._visible(scope, alias)
        if alias is None:
            # Unqualified: every table in the nearest scope that has entries may
            # own it; derived tables only if they expose that name.
            derived = [e for _, e in entries if isinstance(e, _Derived) and e.lookup(col)]
            tables = [e for _, e in entries if isinstance(e, _Table)]
            for d in derived:
                sources |= d.lookup(col) or frozenset()
                self.shape = max(self.shape, d.computed.get(col, PLAIN))
            chosen: list[_Table] = tables
        else:
            chosen = [e for _, e in entries if isinstance(e, _Table)]
            for _, e in entries:
                if isinstance(e, _Derived):
                    found = e.lookup(col)
                    if found is not None:
                        sources |= found
                        self.shape = max(self.shape, e.computed.get(col, PLAIN))
                    else:
                        sources |= e.all_sources()
                        self.shape = max(self.shape, *e.computed.values(), PLAIN)
        if alias is None:
            # Without the catalog an unqualified name in a subquery may also be
            # a column of an enclosing query's table (a correlated reference):
            # attribute it there too, without counting it as a WHERE on it.
            s_with: _Scope | None = scope
            while s_with is not None and not s_with.entries:
                s_with = s_with.parent
            outer = s_with.parent if s_with is not None else None
            while outer is not None:
                for _, e in outer.entries:
                    if isinstance(e, _Table):
                        self.relations[e.key]["columns"].add(col)
                        sources.update(f"{c}.{col}" for c in e.candidates)
                    else:
                        sources |= e.lookup(col) or frozenset()
                        self.shape = max(self.shape, e.computed.get(col, PLAIN))
                outer = outer.parent
            # `SELECT c FROM customers c` or `row_to_json(c)`: a bare table
            # alias is the whole row, every column of it.
            for _, whole in self._visible(scope, col):
                # A whole row is a composite value, computed from its
                # columns: no column rule can apply to it as a column.
                self.shape = max(self.shape, COMPUTED)
                if isinstance(whole, _Table):
                    self.relations[whole.key]["columns"].add("*")
                    sources.update(f"{c}.*" for c in whole.candidates)
                else:
                    sources |= whole.all_sources()
                    self.shape = max(self.shape, PLAIN, *whole.computed.values())
        for table in chosen:
            stored = "*" if col in table.renamed else col
            self.relations[table.key]["columns"].add(stored)
            if record_refs:
                s: _Scope | None = scope
                while s is not None:
                    s.referenced.add(id(table))
                    s = s.parent
            sources.update(f"{c}.{stored}" for c in table.candidates)
        return sources

    def _function(self, names: list[str], call: Node, scope: _Scope) -> None:
        if not names:
            return
        name = names[-1]
        if len(names) >= 2:
            schema, qualified = names[-2], True
        else:
            path = [self.msg.user if s == "$user" else s for s in self.msg.search_path]
            # pg_catalog comes first unless the path puts it later explicitly.
            schema = "pg_catalog"
            if "pg_catalog" in path:
                before = [s for s in path[: path.index("pg_catalog")] if s]
                if before:
                    schema = before[0]
            qualified = False
        key = (schema, name)
        if key not in self.functions:
            self.functions[key] = {"schema": schema, "name": name, "qualified": qualified}
        if name == "set_config":
            args = call.get("args", [])
            if args:
                known, value = _const_value(args[0])
                setting = str(value).lower() if known else ""
                self.details.setdefault("set_config", []).append(setting or "?")
                if setting == "role" or not known:
                    self.flags["set_role"] = True
                if setting == "session_authorization" or not known:
                    self.flags["session_authorization"] = True

    def _comparisons(self, node: Any, scope: _Scope, *, negated: bool,
                     disjunctive: bool) -> None:
        """Record ``column op value`` terms of a WHERE clause.

        ``negated``: under an odd number of NOTs; ``disjunctive``: under an
        OR (or a NOT, which turns AND into OR), so the term alone does not
        bound the result. A policy may only rely on a bound that is neither.
        Every other column reference of the WHERE (in a function, a CASE, an
        IS NULL, the value side of a comparison, ...) is recorded too, as op
        ``ref`` with an unknown value, negated and disjunctive: a rule on
        that column then stays conservative.
        """
        if isinstance(node, list):
            for item in node:
                self._comparisons(item, scope, negated=negated, disjunctive=disjunctive)
            return
        if not isinstance(node, dict):
            return
        if "BoolExpr" in node:
            b = node["BoolExpr"]
            boolop = b.get("boolop")
            inner_neg = negated ^ (boolop == "NOT_EXPR")
            inner_or = disjunctive or boolop in ("OR_EXPR", "NOT_EXPR")
            for arg in b.get("args", []):
                self._comparisons(arg, scope, negated=inner_neg, disjunctive=inner_or)
            return
        if "A_Expr" in node and self._known_comparison(node["A_Expr"], scope, negated,
                                                       disjunctive):
            return
        if "SubLink" in node:
            link = node["SubLink"]
            test = link.get("testexpr")
            if test is not None and _is_column(test):
                # col IN (SELECT ...) / col > ANY (SELECT ...): value unknown
                op_names = _strings(link.get("operName"))
                self._comparison(test, op_names[-1] if op_names else "=", {}, scope,
                                 negated, True)
            elif test is not None:
                self._refs(test, scope)
            return  # the subquery's own WHERE is analysed in its own scope
        if "SelectStmt" in node:
            return
        if "ColumnRef" in node:
            if _is_column(node):
                self._comparison(node, "ref", {}, scope, True, True)
            return
        if "NullTest" in node and _is_column(node["NullTest"].get("arg", {})):
            # col IS [NOT] NULL: whether there is a value, none of its content
            test = node["NullTest"]
            op = "is_not_null" if test.get("nulltesttype") == "IS_NOT_NULL" else "is_null"
            self._comparison(test["arg"], op, {}, scope, negated, disjunctive, known=False)
            return
        # Anything else (function, CASE, IS NULL, IS TRUE, cast, ...): what is
        # inside does not bound the result the way it reads.
        for value in node.values():
            if isinstance(value, (dict, list)):
                self._comparisons(value, scope, negated=True, disjunctive=True)

    def _known_comparison(self, a: Node, scope: _Scope, negated: bool,
                          disjunctive: bool) -> bool:
        """Record an A_Expr the analysis understands; False for any other."""
        kind = a.get("kind", "")
        op_names = _strings(a.get("name"))
        op = op_names[-1] if op_names else ""
        lexpr, rexpr = a.get("lexpr", {}), a.get("rexpr", {})
        if kind == "AEXPR_OP" and op in _COMPARISON_OPS:
            if _is_column(lexpr) and _is_column(rexpr):
                # a = b (a join in WHERE or ON): each side is a term, and
                # carries the other's sources
                self._comparison(lexpr, op, rexpr, scope, negated, disjunctive)
                self._comparison(rexpr, _FLIPPED.get(op, op), lexpr, scope, negated,
                                 disjunctive)
            elif _is_column(lexpr):
                self._comparison(lexpr, op, rexpr, scope, negated, disjunctive)
                self._refs(rexpr, scope)
            elif _is_column(rexpr):
                self._comparison(rexpr, _FLIPPED.get(op, op), lexpr, scope, negated,
                                 disjunctive)
                self._refs(lexpr, scope)
            else:
                self._refs(lexpr, scope)
                self._refs(rexpr, scope)
            return True
        if not _is_column(lexpr):
            return False
        if kind in ("AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM",
                    "AEXPR_NOT_BETWEEN_SYM"):
            bounds = rexpr.get("List", {}).get("items", [])
            if len(bounds) != 2:
                return False
            neg = negated ^ ("NOT" in kind)
            sym = "SYM" in kind  # BETWEEN SYMMETRIC: either bound may be the upper
            self._comparison(lexpr, ">=", bounds[0], scope, neg, disjunctive or neg,
                             known=not sym)
            self._comparison(lexpr, "<=", bounds[1], scope, neg, disjunctive or neg,
                             known=not sym)
            self._refs(bounds, scope)
            return True
        if kind == "AEXPR_IN":
            neg = negated ^ (op == "<>")
            items = rexpr.get("List", {}).get("items", [])
            if not items:
                return False
            for item in items:
                self._comparison(lexpr, "=", item, scope, neg,
                                 disjunctive or neg or len(items) > 1)
            self._refs(items, scope)
            return True
        if kind in ("AEXPR_OP_ANY", "AEXPR_OP_ALL"):
            self._comparison(lexpr, op, {}, scope, negated, True)
            self._refs(rexpr, scope)
            return True
        return False

    def _key_refs(self, items: Any, scope: _Scope) -> None:
        """Sort, group, DISTINCT ON and window keys: a bare column is not a
        condition; the columns inside any other key expression are
        recorded as unknown ``ref`` terms."""
        if not isinstance(items, list):
            return
        for item in items:
            if not isinstance(item, dict):
                continue
            if "WindowDef" in item:
                w = item["WindowDef"]
                self._key_refs(w.get("partitionClause"), scope)
                self._key_refs(w.get("orderClause"), scope)
                continue
            node = item.get("SortBy", {}).get("node", item) if "SortBy" in item else item
            if isinstance(node, dict) and "ColumnRef" in node:
                continue
            if isinstance(node, dict) and "A_Const" in node:
                continue  # an output position: ORDER BY 2
            self._refs(node, scope)

    def _refs(self, node: Any, scope: _Scope) -> None:
        """Columns inside a value expression: recorded as unknown ``ref`` terms."""
        if isinstance(node, list):
            for item in node:
                self._refs(item, scope)
        elif isinstance(node, dict):
            if "ColumnRef" in node:
                if _is_column(node):
                    self._comparison(node, "ref", {}, scope, True, True)
                return
            if "SelectStmt" in node or "SubLink" in node:
                return  # analysed in its own scope
            for value in node.values():
                if isinstance(value, (dict, list)):
                    self._refs(value, scope)

    def _column_as_stored(self, fields: list[Node], scope: _Scope) -> tuple[list[str], bool]:
        """A column reference's sources, and whether it is a column as
        stored (not one computed in a subquery, CTE or function in FROM)."""
        saved, self.shape = self.shape, PLAIN
        sources = sorted(self._column(fields, scope, record_refs=False))
        plain = self.shape == PLAIN
        self.shape = max(saved, self.shape)
        return sources, plain

    def _comparison(self, col: Node, op: str, other: Node, scope: _Scope,
                    negated: bool, disjunctive: bool, *, known: bool = True) -> None:
        while "TypeCast" in col:
            col = col["TypeCast"].get("arg", {})
        fields = col.get("ColumnRef", {}).get("fields", [])
        names = _strings(fields)
        if not names:
            return
        sources, plain = self._column_as_stored(fields, scope)
        entry: dict[str, Any] = {"column": names[-1], "sources": sources, "op": op,
                                 "negated": negated, "disjunctive": disjunctive,
                                 "level": scope.level, "param": None}
        inner = other
        while "TypeCast" in inner:
            inner = inner["TypeCast"].get("arg", {})
        if "ColumnRef" in inner:
            # the other side is a column too: its sources, and whether both
            # sides are columns as stored (not computed in a subquery or CTE)
            other_sources, other_plain = self._column_as_stored(
                inner["ColumnRef"].get("fields", []), scope)
            entry["other_sources"] = other_sources
            entry["other_plain"] = plain and other_plain
        if "ParamRef" in inner:
            number = inner["ParamRef"].get("number", 0)
            self._param(number)
            # Filled in by Analysis.bind() when the Bind values are known
            # (not for BETWEEN SYMMETRIC, whose bounds may swap).
            entry["param"] = number if known else None
            entry["value"] = None
            entry["known"] = False
        else:
            is_known, value = _const_value(other)
            entry["value"] = value
            entry["known"] = is_known and known
        if isinstance(entry["value"], (str, int, float)) and not isinstance(
                entry["value"], bool) and _looks_like_pan(str(entry["value"])):
            entry["value"] = "[redacted]"
            entry["redacted"] = True
        self.comparisons.append(entry)


# How much an output column changed the values it derives from: PLAIN (a
# column as stored), COMPUTED (an expression: no column identity, but the
# digits of a card number stay contiguous, where content detection and the
# strict rule find them: casts, JSON and array builders, concatenation), or
# RESHAPED (through any other function or operator: translate(), encode(),
# substr(), arithmetic; only masking the column as a whole hides it).
PLAIN, COMPUTED, RESHAPED = 0, 1, 2
# (Not the functions named after types: "varchar"(x, 16, true) and
# numeric(x, typmod) are the length and precision coercions a type modifier
# runs, and truncate or round.)
_KEEPS_DIGITS = frozenset({
    "array_agg", "array_to_json", "array_to_string", "concat", "concat_ws",
    "json_agg", "json_build_array", "json_build_object", "jsonb_agg", "jsonb_build_array",
    "jsonb_build_object", "lower", "quote_literal", "quote_nullable",
    "row_to_json", "string_agg", "to_json", "to_jsonb", "unnest", "upper",
})


# Casts whose text output is the digits as they were, whatever the value: a
# type modifier (varchar(12), char(8), numeric(20,2)) may truncate or round,
# other types reformat (money: 374,008,…; interval; float8: 3.7e+14).
_CAST_KEEPS_DIGITS = frozenset({
    "bigint", "bpchar", "bytea", "character varying", "decimal",
    "int", "int2", "int4", "int8", "integer", "json", "jsonb", "numeric", "smallint",
    "text", "varchar",
})


def _builtin_name(names: list[str]) -> str:
    """The lower-case name of an unqualified or pg_catalog-qualified
    function or type; "" for any other schema."""
    if not names or len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
        return ""
    return names[-1].lower()


def _cast_keeps_digits(type_name: Node) -> bool:
    if type_name.get("typmods"):
        return False
    return _builtin_name(_strings(type_name.get("names"))) in _CAST_KEEPS_DIGITS


def _keeps_digits(names: list[str]) -> bool:
    """A built-in that returns its text input's digits as they were."""
    return _builtin_name(names) in _KEEPS_DIGITS


def _computed(cols: list[tuple[str, frozenset[str]]], kinds: list[str],
              shapes: list[int]) -> dict[str, int]:
    return {n: max(sh, COMPUTED) for (n, src), k, sh in zip(cols, kinds, shapes, strict=True)
            if k == "expression" and src}


def _renamed(cols: list[tuple[str, frozenset[str]]], computed: dict[str, int],
             names: list[str]) -> tuple[list[tuple[str, frozenset[str]]], dict[str, int]]:
    """Columns of a derived table renamed by its alias list (`AS x(a, b)`)."""
    out = [(names[i] if i < len(names) else n, src) for i, (n, src) in enumerate(cols)]
    return out, {new: computed[old] for (new, _), (old, _) in zip(out, cols, strict=True)
                 if old in computed}


def _is_column(node: Node) -> bool:
    while "TypeCast" in node:
        node = node["TypeCast"].get("arg", {})
    return "ColumnRef" in node and "A_Star" not in node["ColumnRef"]["fields"][-1]


def _walk_items(node: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for k, v in cur.items():
                out.append((k, v))
                if isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(cur, list):
            stack.extend(cur)
    return out
