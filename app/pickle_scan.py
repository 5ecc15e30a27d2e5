"""Which globals a pickle would import, found by interpreting its opcode stream symbolically.

Nothing is imported or called: `pickletools.genops` decodes the opcodes and this module
replays their stack and memo effects on placeholders, so a global name assembled from
strings (STACK_GLOBAL), fetched back from the memo (BINGET/LONG_BINGET), written with the
old protocol-0/1 string opcodes (STRING/BINSTRING), or named by INST is seen exactly as the
unpickler would see it. Anything the replay cannot resolve to literal strings (a name
computed some other way, the copyreg extension registry) is refused.

`STATE_DICT_GLOBALS` is the exact allow-list (no prefixes) of what `torch.save` writes for a
state_dict of dense tensors: torch's own `weights_only` unpickler allows a superset
(torch/_weights_only_unpickler.py); sparse, quantized, nested and meta tensors, numpy
arrays and tensor subclasses are left out because the zoo's models have none.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass
from typing import BinaryIO

_DTYPES = (
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
)  # fmt: skip
_STORAGES = (
    "Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
    "ComplexDouble", "ComplexFloat",
)  # fmt: skip
STATE_DICT_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch.storage", "UntypedStorage"),
    }
    | {("torch", f"{s}Storage") for s in _STORAGES}
    | {("torch.cuda", f"{s}Storage") for s in _STORAGES}
    | {("torch", d) for d in _DTYPES}
)

_STRING_OPS = {
    "STRING", "BINSTRING", "SHORT_BINSTRING",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
}  # fmt: skip
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
# Bounds on the replay's own memory: a state_dict of a thousand tensors uses ~10k memo slots
# and a stack a few dozen deep; a pickle of nothing but MARK or BINPUT opcodes would otherwise
# grow these by millions of entries.
MAX_MEMO = 200_000
MAX_STACK = 200_000
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


class PickleRefused(ValueError):
    """The pickle imports something outside the allow-list (`global_name` says what), or
    cannot be replayed (`global_name` is None)."""

    def __init__(self, message: str, global_name: str | None = None):
        super().__init__(message)
        self.global_name = global_name


@dataclass(frozen=True)
class _Str:
    value: str


class _Mark:
    pass


_MARK = _Mark()
_OTHER = object()


def pickle_globals(
    data: bytes | BinaryIO, allowed: frozenset[tuple[str, str]] = STATE_DICT_GLOBALS
) -> list[str]:
    """Every global `data` (bytes or a binary stream, read as it goes) would import, as
    "module.name", sorted; PickleRefused if one is outside `allowed` (exact pairs), the
    stream is malformed, or the replay would outgrow MAX_MEMO/MAX_STACK."""
    stack: list = []
    memo: dict[int, object] = {}
    found: set[tuple[str, str]] = set()

    def use(module: str, name: str) -> None:
        if (module, name) not in allowed:
            raise PickleRefused(f"{module}.{name}", global_name=f"{module}.{name}")
        found.add((module, name))

    def pop() -> object:
        if not stack:
            raise PickleRefused("stack underflow (malformed pickle)")
        return stack.pop()

    def pop_mark() -> None:
        while True:
            if pop() is _MARK:
                return

    try:
        for opcode, arg, _pos in pickletools.genops(data):
            name = opcode.name
            if name in _STRING_OPS:
                stack.append(_Str(arg))
            elif name == "GLOBAL":
                module, _, attr = arg.partition(" ")
                use(module, attr)
                stack.append(_OTHER)
            elif name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                if not (isinstance(module, _Str) and isinstance(attr, _Str)):
                    raise PickleRefused("a global whose name is not a literal string")
                use(module.value, attr.value)
                stack.append(_OTHER)
            elif name == "INST":  # protocol 0: import and call in one opcode
                module, _, attr = arg.partition(" ")
                use(module, attr)
                pop_mark()
                stack.append(_OTHER)
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise PickleRefused(f"the copyreg extension registry ({name})")
            elif name in _PUT_OPS:
                if not stack:
                    raise PickleRefused("memo write on an empty stack (malformed pickle)")
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                if not stack:
                    raise PickleRefused("memo write on an empty stack (malformed pickle)")
                memo[len(memo)] = stack[-1]
            elif name in _GET_OPS:
                if arg not in memo:
                    raise PickleRefused(f"memo read of unset slot {arg} (malformed pickle)")
                stack.append(memo[arg])
            else:
                _generic(opcode, stack, pop, pop_mark)
            if len(stack) > MAX_STACK or len(memo) > MAX_MEMO:
                raise PickleRefused(
                    f"a pickle stack or memo above {MAX_STACK} entries (no state_dict needs it)"
                )
    except PickleRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - genops' errors on a corrupt stream
        raise PickleRefused(f"corrupt pickle stream ({str(exc)[:200]})") from None
    return sorted(f"{m}.{n}" for m, n in found)


def _generic(opcode, stack: list, pop, pop_mark) -> None:
    """Stack effect of any other opcode, from pickletools' own description (as its `dis`)."""
    before, after = opcode.stack_before, opcode.stack_after
    markobject = pickletools.markobject
    if markobject in before or (opcode.name == "POP" and stack and stack[-1] is _MARK):
        pop_mark()
        count = before.index(markobject) if markobject in before else 0
    else:
        count = len(before)
    for _ in range(count):
        pop()
    for item in after:
        stack.append(_MARK if item is markobject else _OTHER)
