"""Decide whether a pickle is nothing but a torch.save of tensors in dicts and lists, without running it.

``pickletools.genops`` walks the opcodes while a model of the unpickler's stack tracks kinds (strings and integers as
they are). Only torch's tensor rebuild is called; steps, nesting and sharing are bounded; views stay in their storages.
"""
from __future__ import annotations

import math
import pickletools
from typing import Any

import torch

MAX_OPS = 200_000  # the release's pickle runs ~34,000; a LoRA on every SD2 module about 100,000
MAX_DEPTH = 8  # the release nests dict > dict > tensor arguments > shape tuple


class Refused(Exception):
    """The pickle holds something a tensor file never does (the message says what)."""


class Forbidden(Refused):
    """The pickle names a Python object outside the tensor-file vocabulary (loading it could run code)."""


_GLOBALS = {"torch._utils _rebuild_tensor_v2": "tensor", "torch._utils _rebuild_parameter": "param",
            "collections OrderedDict": "odict"}
_STORAGES = {f"torch {n}Storage": d for n, d in (("Float", torch.float32), ("Half", torch.float16), (
    "BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16),
    ("Char", torch.int8), ("Byte", torch.uint8))}
_SCALAR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BININT", "BININT1", "BININT2", "LONG1", "NEWTRUE", "NEWFALSE",
               "NONE", "BINFLOAT"}
_TUPLE_OPS = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class _Obj:
    """What the scan knows of an object the pickle builds: its kind, its parts, and its size as an unshared tree."""

    __slots__ = ("kind", "items", "size", "depth")

    def __init__(self, kind: str, items: Any = (), children: Any = ()):
        self.kind, self.items, self.size, self.depth = kind, items, 1, 1
        if children:
            self.add(children)

    def add(self, children: Any) -> None:
        for c in children:  # a shared object counts once per reference: sharing shows up as size
            if isinstance(c, _Obj):
                self.size += c.size
                self.depth = max(self.depth, c.depth + 1)
        if self.size > MAX_OPS or self.depth > MAX_DEPTH:
            raise Refused("its pickle nests or shares structures far beyond what a tensor file holds")


def _ints(v: Any, bound: int) -> tuple[int, ...]:
    if not (isinstance(v, _Obj) and v.kind == "tuple" and len(v.items) <= 8 and all(
            type(x) is int and 0 <= x <= bound for x in v.items)):
        raise Refused("a tensor record has an invalid shape or stride")
    return v.items


def _rebuild_tensor(args: tuple) -> _Obj:
    storage, offset, size, stride, grad, hooks, *meta = args + (None,) * (6 - len(args))
    if not isinstance(storage, _Obj) or storage.kind != "storage" or type(offset) is not int or offset < 0 or (
            type(grad) is not bool) or len(meta) > 1 or not (isinstance(hooks, _Obj) and hooks.kind == "odict"
                                                              and hooks.size == 1):
        raise Refused("a tensor record is malformed or carries hooks")
    numel = storage.items[1]
    size, stride = _ints(size, 1 << 31), _ints(stride, numel)
    if len(size) != len(stride) or (math.prod(size) and not is_dense(size, stride)):
        raise Refused("a tensor is an expanded or overlapping view of its storage")
    if math.prod(size) and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= numel:
        raise Refused("a tensor views bytes outside its storage")
    return _Obj("tensor")


def scan(data: bytes, records: dict[str, int]) -> Any:
    """Walk a pickle's opcodes without running them; refuse what a torch.save of a release dict never contains."""
    stack: list = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list:
        items = stack[marks[-1]:]
        del stack[marks.pop():]
        return items

    for n, (op, arg, _) in enumerate(pickletools.genops(data)):
        name = op.name
        if n > MAX_OPS:
            raise Refused(f"its pickle runs more than {MAX_OPS:,} steps (the release's runs ~34,000)")
        if name in ("GLOBAL", "INST", "STACK_GLOBAL"):
            if name == "STACK_GLOBAL":
                if len(stack) < 2 or not all(type(x) is str for x in stack[-2:]):
                    raise Refused("its pickle names an object without a name")
                arg = " ".join(stack[-2:])
                del stack[-2:]
            if arg not in _GLOBALS and arg not in _STORAGES:
                raise Forbidden(arg.replace(" ", ".")[:120])
            if name == "INST":
                raise Refused("its pickle uses INST, which torch.save never writes")
            stack.append(_Obj("global", _GLOBALS.get(arg) or _STORAGES[arg]))
        elif name in _SCALAR_OPS:
            stack.append({"NEWTRUE": True, "NEWFALSE": False, "NONE": None}.get(name, arg))
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name in _TUPLE_OPS or name == "TUPLE":
            items = pop_mark() if name == "TUPLE" else [stack.pop() for _ in range(_TUPLE_OPS[name])][::-1]
            stack.append(_Obj("tuple", tuple(items), items))
        elif name in ("EMPTY_LIST", "EMPTY_DICT"):
            stack.append(_Obj(name[6:].lower()))
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            if getattr(stack[-1], "kind", "") != "list":
                raise Refused("it appends to something that is not a list")
            stack[-1].add(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = [stack.pop(-2), stack.pop()] if name == "SETITEM" else pop_mark()
            if getattr(stack[-1], "kind", "") not in ("dict", "odict") or len(items) % 2 or not all(
                    type(k) is str for k in items[::2]):
                raise Refused("it sets dict items with keys that are not strings, or on something not a dict")
            stack[-1].add(items)
        elif name == "BINPERSID":
            pid = stack.pop()
            ok = getattr(pid, "kind", "") == "tuple" and len(pid.items) == 5
            tag, stype, key, _, numel = pid.items if ok else (None,) * 5
            if tag != "storage" or not isinstance(stype, _Obj) or not isinstance(stype.items, torch.dtype) \
                    or type(key) is not str or type(numel) is not int or numel < 0:
                raise Refused("it has a persistent object that is not a tensor storage")
            if records.get(key) != numel * stype.items.itemsize:
                raise Refused(f"a storage declares {numel * stype.items.itemsize} bytes but the file's record "
                               f"'data/{key[:20]}' holds {records.get(key, 'none')}")
            stack.append(_Obj("storage", (stype.items, numel)))
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            kind = fn.items if isinstance(fn, _Obj) and fn.kind == "global" else None
            if not isinstance(args, _Obj) or args.kind != "tuple" or kind not in ("tensor", "param", "odict"):
                raise Refused("it calls something other than torch's tensor rebuild")
            if kind == "tensor":
                stack.append(_rebuild_tensor(args.items))
            elif kind == "param":
                if len(args.items) != 3 or getattr(args.items[0], "kind", "") != "tensor":
                    raise Refused("a parameter record is malformed")
                stack.append(args.items[0])
            elif args.items:
                raise Refused("it rebuilds a dict from arguments")
            else:
                stack.append(_Obj("odict"))
        elif name == "BUILD":  # the ``_metadata`` of a module state_dict (an OrderedDict)
            state = stack.pop()
            if getattr(stack[-1], "kind", "") != "odict" or getattr(state, "kind", "") != "dict":
                raise Refused("it sets the state of something that is not a state dict")
            stack[-1].add([state])
        elif name == "STOP":
            return stack.pop()
        else:
            raise Refused(f"its pickle uses {name}, which torch.save never writes")
    raise Refused("its pickle has no end")


def is_dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True for a permutation of a contiguous layout: no element aliased (an expanded view), none skipped."""
    expect = 1
    for st, s in sorted((st, s) for s, st in zip(shape, stride) if s != 1):
        if st != expect:
            return False
        expect *= s
    return True
