"""Find the shell commands the documentation quotes (README.md, docs/*.md).

Used by ``test_docs_commands.py``; kept free of pytest so it can be run on its
own (``python tests/integration/docs_commands.py`` lists what it finds).

What counts as a quoted command:

- every logical line of a fenced block marked ``sh``, ``bash``, ``shell`` or
  ``console`` (for ``console`` only the lines with a ``$ `` prompt);
- in an unmarked fenced block, the lines whose first word (after ``$ `` and
  ``VAR=value`` prefixes) is a program from :data:`PROGRAMS`;
- an inline code span outside fenced blocks whose first word (after
  ``VAR=value`` prefixes) is such a program, e.g. `` `pgwarden audit verify` ``.

A logical line has its ``\\`` continuations joined, its ``$ `` prompt and its
trailing ``# comment`` removed, and is split at top-level ``;``. Usage
synopses (``[--since 7d|2026-11-01]``) are kept as written; :func:`variants`
expands them into runnable command lines.

:func:`family` says what a command is (``pgwarden audit verify``, ``make
demo``, ``opa test``, ``setup`` for a line that only sets variables), resolving
``pgwarden`` subcommands against the real command tree (:func:`resolve`, which
also names subcommands and options that do not exist); :func:`mentions` finds
inline spans that only name a command quoted in full elsewhere.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent

SHELL_LANGS = frozenset({"sh", "bash", "shell", "console", "zsh"})

# First words that make a line (or an inline span) a command.
PROGRAMS = frozenset({
    "pgwarden", ".venv/bin/pgwarden", "make", "opa", ".cache/bin/opa", "psql", "pgbench",
    "python", "python3", ".venv/bin/python", "pytest", ".venv/bin/pytest", "kubectl",
    "docker", "source", ".", "export", "envoy", "git", "curl",
})

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`]*)")
INLINE = re.compile(r"(?<!`)(`+)(?!`)(?P<code>.+?)(?<!`)\1(?!`)", re.S)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class DocCommand:
    """One command as the documentation quotes it."""

    path: str  # relative to the repository, e.g. "docs/auditors.md"
    line: int  # 1-based line where it starts
    text: str  # normalised: continuations joined, prompt and comment removed
    inline: bool  # from an inline code span (not a fenced block)
    block: int = -1  # index of the fenced block (-1 for inline spans)
    prelude: tuple[str, ...] = field(default=())  # earlier set-up lines of the block

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


# --------------------------------------------------------------------------- shell text


def _scan(text: str) -> list[tuple[int, str, bool]]:
    """(index, char, quoted) for each character; quoted = inside '', "" or escaped."""
    out: list[tuple[int, str, bool]] = []
    quote = ""
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            out.append((i, ch, True))
            escaped = False
            continue
        if ch == "\\" and quote != "'":
            escaped = True
            out.append((i, ch, True))
            continue
        if quote:
            if ch == quote:
                quote = ""
            out.append((i, ch, True))
            continue
        if ch in "'\"":
            quote = ch
            out.append((i, ch, True))
            continue
        out.append((i, ch, False))
    return out


def strip_comment(text: str) -> str:
    """Remove a trailing ``# comment`` (a ``#`` outside quotes that starts a word)."""
    for i, ch, quoted in _scan(text):
        if ch == "#" and not quoted and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


def split_top(text: str, sep: str = ";") -> list[str]:
    """Split at ``sep`` outside quotes and outside ``$( )``."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch, quoted in _scan(text):
        if quoted:
            continue
        if ch == "(" and i > 0 and text[i - 1] == "$":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def split_words(text: str) -> list[str]:
    """Shell words (quotes removed); falls back to whitespace for odd quoting."""
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def strip_assignments(words: list[str]) -> list[str]:
    """Drop leading ``VAR=value`` words (environment prefixes)."""
    i = 0
    while i < len(words) and ASSIGNMENT.match(words[i]):
        i += 1
    return words[i:]


def program_of(text: str) -> str:
    words = strip_assignments(split_words(text.strip()))
    return words[0] if words else ""


def is_setup(text: str) -> bool:
    """A line that only sets the shell up for the next ones: ``VAR=...``,
    ``export VAR=...``, ``source FILE``."""
    words = split_words(re.sub(r"\$\([^()]*\)", "SUBST", text))
    if not words:
        return False
    if words[0] in ("source", "."):
        return True
    if words[0] == "export":
        return all(ASSIGNMENT.match(w) for w in words[1:])
    return all(ASSIGNMENT.match(w) for w in words)


def _starts_with_program(text: str) -> bool:
    return program_of(text) in PROGRAMS


# --------------------------------------------------------------------------- markdown


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join ``\\`` continuations; keeps the number of the first physical line."""
    out: list[tuple[int, str]] = []
    buf = ""
    start = 0
    for number, raw in lines:
        line = raw.rstrip()
        if not buf:
            start = number
        if line.endswith("\\") and not line.endswith("\\\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line.strip() if buf else line
        out.append((start, buf))
        buf = ""
    if buf:
        out.append((start, buf.rstrip()))
    return out


def _block_commands(path: str, block: int, lang: str,
                    lines: list[tuple[int, str]]) -> list[DocCommand]:
    marked = lang in SHELL_LANGS
    found: list[DocCommand] = []
    prelude: list[str] = []
    for number, logical in _logical_lines(lines):
        text = logical.strip()
        prompted = text.startswith("$ ") or text == "$"
        if prompted:
            text = text[1:].strip()
        elif lang == "console":
            continue  # output of the previous command
        text = strip_comment(text)
        if not text:
            continue
        for part in split_top(text):
            if not (marked or prompted or _starts_with_program(part)):
                continue
            found.append(DocCommand(path, number, part, False, block, tuple(prelude)))
            if is_setup(part):
                prelude.append(part)
    return found


def extract_file(path: Path, root: Path = ROOT) -> list[DocCommand]:
    rel = path.relative_to(root).as_posix()
    found: list[DocCommand] = []
    prose: list[str] = []  # the file with fenced blocks blanked (line numbers kept)
    fence = ""
    indent = 0
    lang = ""
    block_lines: list[tuple[int, str]] = []
    blocks = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if fence:
            stripped = line.strip()
            if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                found.extend(_block_commands(rel, blocks, lang, block_lines))
                blocks += 1
                fence = ""
            else:
                # dedent by the fence's indentation (blocks inside list items)
                block_lines.append((number, line[indent:] if line[:indent].isspace() else line))
            prose.append("")
            continue
        m = FENCE.match(line)
        if m:
            fence = m.group("fence")
            indent = len(m.group("indent"))
            lang = m.group("lang").lower()
            block_lines = []
            prose.append("")
            continue
        prose.append(line)
    text = "\n".join(prose)
    for m in INLINE.finditer(text):
        # ``\|`` is how a table cell spells a pipe, even inside code
        code = " ".join(m.group("code").replace("\\|", "|").split())
        if _starts_with_program(code) and len(strip_assignments(split_words(code))) > 1:
            number = text.count("\n", 0, m.start("code")) + 1
            found.append(DocCommand(rel, number, strip_comment(code), True))
    return found


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def extract_all(root: Path = ROOT) -> list[DocCommand]:
    out: list[DocCommand] = []
    for path in doc_files(root):
        out.extend(extract_file(path, root))
    return out


# --------------------------------------------------------------------------- synopses


def _top_groups(text: str) -> list[tuple[int, int]]:
    """Spans of top-level ``[ ... ]`` groups that start a word (usage syntax)."""
    spans: list[tuple[int, int]] = []
    depth = 0
    start = 0
    for i, ch, quoted in _scan(text):
        if quoted:
            continue
        if ch == "[" and (depth or i == 0 or text[i - 1] in " \t"):
            if depth == 0:
                start = i
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def is_synopsis(text: str) -> bool:
    return bool(_top_groups(text))


def _alternatives(group: str) -> list[str]:
    """``--since 7d|2026-11-01`` → [``--since 7d``, ``--since 2026-11-01``]
    (``|`` inside a word; a lone ``|`` between words separates whole forms);
    nested groups are expanded the same way."""
    inner = group[1:-1].strip()
    words = inner.split()
    if "|" in words:  # [--store URL | --policyd HOST:PORT]
        forms: list[str] = []
        current: list[str] = []
        for w in [*words, "|"]:
            if w == "|":
                forms.append(" ".join(current))
                current = []
            else:
                current.append(w)
        return [v for form in forms for v in variants(form)]
    for index, w in enumerate(words):
        if "|" in w:
            head, tail = words[:index], words[index + 1:]
            return [" ".join([*head, alt, *tail]) for alt in w.split("|")]
    return variants(inner)


def _word_alternatives(text: str) -> list[str] | None:
    """``pgwarden approvals approve|deny`` → both commands (a ``|`` inside an
    unquoted word outside brackets; a spaced ``|`` is a pipe)."""
    words = text.split(" ")
    for index, word in enumerate(words):
        if "|" in word and word != "|" and not any(q in word for q in "'\"[]"):
            return [" ".join([*words[:index], alt, *words[index + 1:]])
                    for alt in word.split("|")]
    return None


def variants(text: str) -> list[str]:
    """Runnable forms of a usage synopsis: the bare command, then forms that
    together use every optional group and every alternative (the i-th form
    takes each group's i-th alternative, or its last)."""
    spans = _top_groups(text)
    if not spans:
        alternatives = _word_alternatives(text)
        if alternatives is None:
            return [text]
        return [v for alt in alternatives for v in variants(alt)]
    pieces: list[str] = []
    groups: list[list[str]] = []
    last = 0
    for start, end in spans:
        pieces.append(text[last:start])
        groups.append(_alternatives(text[start:end]))
        last = end
    pieces.append(text[last:])

    def join(choice: list[str]) -> str:
        out = pieces[0]
        for i, alt in enumerate(choice):
            out += alt + pieces[i + 1]
        return " ".join(out.split())

    forms = [join([""] * len(groups))]
    for i in range(max(len(g) for g in groups)):
        forms.append(join([g[min(i, len(g) - 1)] for g in groups]))
    unique: list[str] = []
    for form in forms:
        if form not in unique:
            unique.append(form)
    return unique


# --------------------------------------------------------------------------- pgwarden


PGWARDEN_NAMES = ("pgwarden", ".venv/bin/pgwarden")


def _segments(words: list[str]) -> list[list[str]]:
    """Simple commands of a pipeline/list (split at |, &&, ||, ;)."""
    out: list[list[str]] = [[]]
    for w in words:
        if w in ("|", "&&", "||", ";"):
            out.append([])
        else:
            out[-1].append(w)
    return [s for s in out if s]


def pgwarden_invocations(text: str) -> list[list[str]]:
    """Each ``pgwarden ...`` call in a command line, its arguments as words,
    including calls inside ``$( )`` (``TOKEN=$(pgwarden token mint ...)``)."""
    calls: list[list[str]] = []
    for inner in re.findall(r"\$\(([^()]*)\)", text):
        calls.extend(pgwarden_invocations(inner))
    outer = re.sub(r"\$\(([^()]*)\)", "SUBST", text)
    for seg in _segments(split_words(outer.replace("|", " | "))):
        seg = strip_assignments(seg)
        if seg and seg[0] in PGWARDEN_NAMES:
            calls.append(seg[1:])
    return calls


# --------------------------------------------------------------------------- classification

# How the docs spell a program → the program (the docs use both forms).
PROGRAM_ALIASES = {
    ".venv/bin/pgwarden": "pgwarden", ".cache/bin/opa": "opa", ".venv/bin/python": "python",
    "python3": "python", ".venv/bin/pytest": "pytest",
}


def normalize_program(text: str) -> str:
    """The command with the program spelled one way (for prefix comparisons)."""
    words = split_words(text)
    return " ".join(PROGRAM_ALIASES.get(w, w) for w in words)


def _click_root() -> Any:
    import typer

    from pgwarden.cli import app

    return typer.main.get_command(app)


_ROOT_CMD: Any = None


def click_root() -> Any:
    global _ROOT_CMD
    if _ROOT_CMD is None:
        _ROOT_CMD = _click_root()
    return _ROOT_CMD


@dataclass
class Resolved:
    """A ``pgwarden`` call matched against the real command tree."""

    path: list[str]  # subcommand names, e.g. ["audit", "verify"]
    command: Any  # the click command
    rest: list[str]  # arguments after the path
    problems: list[str]


def resolve(args: list[str]) -> Resolved:
    cmd = click_root()
    path: list[str] = []
    rest = [w for w in args if w != "..."]
    problems: list[str] = []
    # typer vendors its own click: a group is whatever has subcommands
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        if sub is None:
            if cmd.commands:
                problems.append(f"`pgwarden {' '.join([*path, rest[0]])}`: no such subcommand "
                                f"(`pgwarden {' '.join(path)}` has {', '.join(sorted(cmd.commands))})")
            break
        path.append(rest.pop(0))
        cmd = sub
    names = {"--help"}
    for param in cmd.params:
        names.update(param.opts)
        names.update(getattr(param, "secondary_opts", ()))
    for word in rest:
        if word.startswith("-") and len(word) > 1 and not word[1:2].isdigit():
            name = word.split("=", 1)[0]
            if name not in names:
                problems.append(f"`pgwarden {' '.join(path)}` has no option {name}")
    return Resolved(path, cmd, rest, problems)


def _first_segment(text: str) -> list[str]:
    """Words of the pipeline stage that names a known program (so
    ``get-a-token | pgwarden token verify ...`` is a ``pgwarden`` command)."""
    segments = _segments(split_words(text.replace("|", " | ")))
    for seg in segments:
        seg = strip_assignments(seg)
        if seg and seg[0] in PROGRAMS and seg[0] not in ("source", ".", "export"):
            return seg
    return strip_assignments(segments[0]) if segments else []


def family(text: str) -> str:
    """What kind of command this is: ``pgwarden audit verify``, ``make demo``,
    ``opa test``, ``psql``, ``setup`` (a line that only sets variables) ..."""
    if is_setup(text):
        return "setup"
    words = [PROGRAM_ALIASES.get(w, w) for w in _first_segment(text)]
    if not words:
        return ""
    prog = words[0]
    args = words[1:]
    if prog == "pgwarden":
        return " ".join(["pgwarden", *resolve(args).path])
    if prog == "python":
        if args[:2] == ["-m", "pytest"]:
            return "pytest"
        if args[:1] == ["-m"] and len(args) > 1:
            return f"python -m {args[1]}"
        return f"python {args[0]}" if args else "python"
    if prog in ("make", "opa", "kubectl", "docker", "git"):
        sub = next((a for a in args if not a.startswith("-") and not ASSIGNMENT.match(a)), "")
        return f"{prog} {sub}".strip()
    return prog


def is_prefix(short: str, long: str) -> bool:
    a, b = split_words(normalize_program(short)), split_words(normalize_program(long))
    return len(a) < len(b) and b[:len(a)] == a


def mentions(commands: list[DocCommand]) -> dict[DocCommand, str]:
    """Inline spans that only name a command another quote gives in full
    (`` `pgwarden replay` `` next to ``pgwarden replay SESSION_ID``): each
    mapped to that fuller quote. They are checked for existence, not run."""
    forms = [(c, v) for c in commands for v in variants(c.text)]
    found: dict[DocCommand, str] = {}
    for cmd in commands:
        if not cmd.inline:
            continue
        fuller: list[str] = []
        for v in variants(cmd.text):
            v = " ".join(w for w in v.split(" ") if w != "...")
            match = next((str(other) for other, form in forms
                          if other is not cmd and is_prefix(v, form)), None)
            if match is None:
                break
            fuller.append(match)
        else:
            found[cmd] = fuller[0]
    return found


OPTION_SPAN = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def option_spans(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Options quoted on their own in prose (`` `--since` ``, `` `--key FILE` ``):
    (line, option)."""
    out: list[tuple[int, str]] = []
    fence = ""
    prose: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = FENCE.match(line)
        if fence:
            if line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
                fence = ""
            prose.append("")
        elif m:
            fence = m.group("fence")
            prose.append("")
        else:
            prose.append(line)
    text = "\n".join(prose)
    for m in INLINE.finditer(text):
        code = m.group("code").strip()
        if code.startswith("--"):
            number = text.count("\n", 0, m.start("code")) + 1
            out.extend((number, opt) for opt in OPTION_SPAN.findall(code))
    return out


if __name__ == "__main__":  # pragma: no cover - a listing for humans
    for cmd in extract_all():
        print(f"{'inline' if cmd.inline else 'block '} {cmd}")
