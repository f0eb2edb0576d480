# Types of the C module tap/_wire.c (its docstrings say what each returns).
from collections.abc import Sequence

def split_frames(data: bytes | bytearray,
                 max_size: int) -> tuple[list[tuple[int, int, int]], int, int | None]: ...
def walk_rules(block: bytes, frames: Sequence[tuple[int, int, int]], lo: int, hi: int,
               kinds: bytes, max_message: int,
               ) -> tuple[bytes | None, list[int], list[tuple[int, int, int]]] | None: ...
