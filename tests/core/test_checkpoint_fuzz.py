"""Property-based fuzzing of the checkpoint loader (issues 4 and 11): hostile dicts, truncations, bit flips, random
bytes, code pickles, lying tensor records, lying safetensors headers, archive differentials and shared structures.

Every generated input must end in a CheckpointError whose message names the file and says how to fix it, or (for
mutations that may leave a valid file) load into LoRAs that satisfy the layout's invariants. Never another exception,
never a hang (an interval timer turns one into a failure), never a large allocation: each example's peak resident
memory growth is measured with the kernel's high-water mark (reset per example through /proc/self/clear_refs).

Malicious pickles are assembled from opcodes and only handed to our loader. Their payloads would create a marker
file (or call a canary) if anything ever ran them; both are checked after every example.

Examples per property: ``PISA_FUZZ_EXAMPLES`` (default 50; CI may raise it). Runs are derandomized (reproducible) unless
``PISA_FUZZ_RANDOM=1``. The totals are printed at the end of the module.
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import tempfile
import time
from contextlib import contextmanager, nullcontext

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pisa_sr import checkpoint as ckpt
from pisa_sr.checkpoint import CheckpointError, PisaLoras, load_checkpoint, parse_release_dict
from pisa_sr.pickle_scan import MAX_OPS, is_dense
from hostile_files import (DIFFERENTIAL, Op, conversion_bytes, dag_key_pickle, hand_torch_zip, make_zip, pickle_zip,
                           small_release_dict, torch_save_bytes, zip_entries)

EXAMPLES = int(os.environ.get("PISA_FUZZ_EXAMPLES", "50"))
TIME_LIMIT_S = 60.0  # hang guard per example: the slowest (the step-limit flood) takes 1-4 s on a loaded 2-core machine
MEM_LIMIT_MB = 128  # per example peak RSS growth; the inputs are a few KB, their lies claim gigabytes or more
FIX_WORDS = ("download", "convert", "rename", "permissions")
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=os.environ.get("PISA_FUZZ_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
pytestmark = [pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")]  # reprs of 1 MB inputs
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
CANARY: list = []
WORK = tempfile.mkdtemp(prefix="pisa-fuzz-")
MARKER = os.path.join(WORK, "PAYLOAD_RAN")


def canary(*args):  # referenced by name from the malicious pickles; must never be called
    CANARY.append(args)


# ------------------------------------------------------------------------------------------------ harness
class Hang(Exception):
    pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.MULTILINE).group(1))


@contextmanager
def guarded(label: str, time_limit_s: float = TIME_LIMIT_S):
    """Time limit and peak-memory bound around one example."""
    try:  # reset the kernel's high-water mark (VmHWM) so that the peak is this example's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:
        exact = False
    rss0 = _status_kb("VmRSS")
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def on_alarm(signum, frame):
        raise Hang(f"{label}: no answer within {time_limit_s} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit_s)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    elapsed = time.perf_counter() - t0
    grew_mb = ((_status_kb("VmHWM") - rss0) if exact
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0) / 1024
    COUNTS[label]["max_ms"] = max(COUNTS[label]["max_ms"], int(elapsed * 1000))
    COUNTS[label]["max_mem_mb"] = max(COUNTS[label]["max_mem_mb"], int(grew_mb))
    assert grew_mb < MEM_LIMIT_MB, f"{label}: peak memory grew by {grew_mb:.0f} MB"
    assert not os.path.exists(MARKER) and not CANARY, "a payload from a fuzzed file ran"


def test_harness_catches_a_large_allocation_and_a_hang():
    """The guard is what makes "no hang, no big allocation" true, so it is tested too."""
    with pytest.raises(AssertionError, match="peak memory grew"):
        with guarded("harness_self_test"):
            block = torch.ones(64 * 1024**2, dtype=torch.float32)  # 256 MB, touched
            del block
    with pytest.raises(Hang):
        with guarded("harness_self_test", time_limit_s=0.2):
            while True:
                pass
    COUNTS.pop("harness_self_test", None)


def check_invariants(loras: PisaLoras) -> None:
    assert isinstance(loras, PisaLoras)
    for s in loras.sets():
        assert 1 <= s.rank <= ckpt.MAX_RANK and 0 < len(s) <= ckpt.MAX_MODULES
        assert set(s.pairs) == set(s.parts)
        for m, p in s.pairs.items():
            assert ckpt._MODULE_RE.fullmatch(m)
            assert p.down.dtype in ckpt.ALLOWED_DTYPES and p.down.dtype == p.up.dtype
            assert p.down.shape[0] == s.rank and p.up.shape[1] == s.rank and p.down.dim() == p.up.dim()
            assert bool(torch.isfinite(p.down).all()) and bool(torch.isfinite(p.up).all())


def outcome(label: str, name: str, fn, must_refuse: bool) -> str | None:
    """Run ``fn``: a clean refusal (naming ``name`` and a fix) returns its message; otherwise, unless ``must_refuse``,
    the result must be valid."""
    COUNTS[label]["examples"] += 1
    with guarded(label):
        try:
            result = fn()
        except CheckpointError as e:
            msg = str(e)
            assert name in msg, msg
            assert ckpt._UNEXPECTED not in msg, msg
            assert any(w in msg.lower() for w in FIX_WORDS), msg
            COUNTS[label]["refused"] += 1
            return msg
    assert not must_refuse, f"{label}: accepted an input that must be refused"
    check_invariants(result)
    COUNTS[label]["accepted"] += 1


_n = 0


def load_bytes(label: str, data: bytes, ext: str, must_refuse: bool) -> str | None:
    global _n
    _n += 1
    name = f"case{_n}{ext}"
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    try:
        return outcome(label, name, lambda: load_checkpoint(path), must_refuse)
    finally:
        os.remove(path)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    shutil.rmtree(WORK, ignore_errors=True)
    lines = ["", f"checkpoint fuzz totals ({EXAMPLES} examples per property requested):"]
    for label, c in sorted(COUNTS.items()):
        lines.append(f"  {label:<24} examples {c['examples']:>5}  refused {c['refused']:>5}  accepted "
                     f"{c['accepted']:>4}  slowest {c['max_ms']:>5} ms  peak mem +{c['max_mem_mb']} MB")
        kinds = sorted((k[5:], n) for k, n in c.items() if k.startswith("kind:"))
        if kinds:
            lines.append("      by kind: " + ", ".join(f"{k} {n}" for k, n in kinds))
    lines.append(f"  {'all':<24} examples {sum(c['examples'] for c in COUNTS.values()):>5}")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else nullcontext():
        print("\n".join(lines))


BASE = small_release_dict()
BASE_RANK = BASE["lora_rank_unet_pix"]
TOP_KEYS = sorted(BASE)
TENSOR_KEYS = sorted(BASE["state_dict_unet"])
LIST_KEYS = [k for k in TOP_KEYS if k.startswith("unet_lora_")]


def fresh() -> dict:
    return copy.deepcopy(BASE)


# ------------------------------------------------------------------------------------------------ strategies
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64, torch.int8]


def make_tensor(dtype, shape, fill):
    t = torch.zeros(shape, dtype=torch.float64)
    if fill == "randn":
        t = torch.randn(shape, dtype=torch.float64)
    elif fill in ("nan", "inf", "-inf") and t.numel():
        t.view(-1)[t.numel() // 2] = float(fill)
    return t.to(dtype)


def _dag_bomb(depth: int):
    x: list = []
    for _ in range(depth):
        x = [x, x]  # repr is 2**depth long: a validator that prints it hangs
    return x


def _self_ref():
    x: list = []
    x.append(x)
    return x


class Weird(dict):  # a dict subclass (torch.load never makes one, but the API must not trust it)
    pass


special = st.sampled_from(["selfref", "bigint", "longstr", "manynames", "expanded", "sparse", "meta",
                           "param", "noncontig", "weirddict", "bytes", "set"]).map(lambda k: {
    "selfref": _self_ref, "bigint": lambda: 10**5000,
    "longstr": lambda: "x" * 1_000_000, "manynames": lambda: ["conv_in"] * 100_000,
    "expanded": lambda: torch.zeros(1).expand(20480, 20480),
    "sparse": lambda: torch.eye(4).to_sparse(), "meta": lambda: torch.empty(2, 4, device="meta"),
    "param": lambda: torch.nn.Parameter(torch.randn(2, 4)), "noncontig": lambda: torch.randn(4, 2).t(),
    "weirddict": lambda: Weird(a=1), "bytes": lambda: b"\x00" * 100, "set": lambda: {1, 2},
}[k]())
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**200, 2**200),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40),
                    st.complex_numbers(allow_nan=True))
tensors = st.builds(make_tensor, st.sampled_from(DTYPES),
                    st.lists(st.integers(0, 5), max_size=5).map(tuple), st.sampled_from(["randn", "zero", "nan",
                                                                                          "inf", "-inf"]))
junk = st.recursive(st.one_of(scalars, tensors, special),
                    lambda ch: st.one_of(st.lists(ch, max_size=4), st.tuples(ch, ch),
                                         st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), ch,
                                                         max_size=4)), max_leaves=12)
module_names = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}(\.[A-Za-z0-9_]{1,6}){0,5}", fullmatch=True),
    st.sampled_from(["", ".", "a..b", "__class__", "a.__dict__", "down_blocks.0.resnets.0.conv1.lora_A.default",
                     "x" * 300, "a." * 40 + "b", "conv_in\n", "con v", "down_blocks.0.résnets", "../../etc/passwd",
                     "mid_block.resnets.0.conv1"]))
ranks = st.one_of(st.integers(-10, 300), st.integers(), st.sampled_from([0, -1, 257, 2**31, 2**63, 10**30, True,
                                                                          False, 2.0, "2", None, [2]]),
                  st.sampled_from([torch.tensor(2), torch.tensor([2]), torch.tensor(2.0), torch.tensor(10**9),
                                   torch.tensor(True), torch.tensor([2, 2]), torch.tensor(2, dtype=torch.uint8),
                                   torch.tensor(2 + 0j)]))


def _same_rank(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dtype in ckpt._INT_DTYPES and v.numel() == 1 and int(v.reshape(()).item()) == BASE_RANK
    return type(v) is int and v == BASE_RANK


def _valid_replacement(key: str, t) -> bool:
    """Whether tensor ``t`` in slot ``key`` still forms a valid file (in-features are only checked against a model)."""
    ref = BASE["state_dict_unet"][key]
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.device.type != "cpu":
        return False
    if t.dtype != ref.dtype or t.dim() != ref.dim() or t.is_neg() or t.is_conj():
        return False
    if not is_dense(tuple(t.shape), tuple(t.stride())) or any(s <= 0 or s > ckpt.MAX_DIM for s in t.shape):
        return False
    if ".lora_A." in key:
        shape_ok = t.shape[0] == BASE_RANK and (t.dim() == 2 or max(t.shape[2:]) <= ckpt.MAX_KERNEL)
    else:
        shape_ok = t.shape[1] == BASE_RANK and (t.dim() == 2 or tuple(t.shape[2:]) == (1, 1))
    return shape_ok and bool(torch.isfinite(t).all())


# ------------------------------------------------------------------------------------------------ dict properties
@st.composite
def single_mutation(draw):
    """(description, mutated dict, must_refuse)."""
    sd = fresh()
    kind = draw(st.sampled_from(["drop_top", "extra_top", "replace_top", "rank", "tensor", "state_extra",
                                 "state_drop", "rename", "rename_consistent", "duplicate", "nonfinite", "whole",
                                 "list_item", "state_key"]))
    if kind == "drop_top":
        del sd[draw(st.sampled_from(TOP_KEYS))]
        return kind, sd, True
    if kind == "extra_top":
        key = draw(st.one_of(st.text(max_size=30), st.integers(), st.sampled_from(["__class__", "lora_alpha"]))
                   .filter(lambda k: k not in BASE))
        sd[key] = draw(junk)
        return kind, sd, True
    if kind == "replace_top":
        key = draw(st.sampled_from(TOP_KEYS))
        sd[key] = draw(junk)
        return kind, sd, False  # junk can coincide with something valid (e.g. the same rank)
    if kind == "rank":
        which = draw(st.sampled_from(["lora_rank_unet_pix", "lora_rank_unet_sem"]))
        sd[which] = v = draw(ranks)
        return kind, sd, not _same_rank(v)
    if kind == "tensor":
        key = draw(st.sampled_from(TENSOR_KEYS))
        sd["state_dict_unet"][key] = t = draw(st.one_of(tensors, special, junk))
        return kind, sd, not _valid_replacement(key, t)
    if kind == "state_extra":
        key = draw(st.one_of(st.text(max_size=60), st.sampled_from([TENSOR_KEYS[0].replace("pix", "sem2")]))
                   .filter(lambda k: k not in BASE["state_dict_unet"]))
        sd["state_dict_unet"][key] = draw(st.one_of(tensors, junk))
        return kind, sd, True
    if kind == "state_drop":
        del sd["state_dict_unet"][draw(st.sampled_from(TENSOR_KEYS))]
        return kind, sd, True
    if kind in ("rename", "rename_consistent"):
        lk = draw(st.sampled_from(LIST_KEYS))
        old = sd[lk][0]
        new = draw(module_names)
        sd[lk] = [new]
        if kind == "rename_consistent" and isinstance(new, str):
            state = sd["state_dict_unet"]
            tail = lk[len("unet_lora_"):].replace("_modules_", "_")  # e.g. encoder_pix
            for ab in "AB":
                state[f"{new}.lora_{ab}.default_{tail}.weight"] = state.pop(f"{old}.lora_{ab}.default_{tail}.weight")
            return kind, sd, False
        return kind, sd, new != old
    if kind == "duplicate":
        kd = draw(st.sampled_from(ckpt.KINDS))
        src, dst = draw(st.sampled_from([(a, b) for a in ckpt.PARTS for b in ckpt.PARTS]))
        sd[f"unet_lora_{dst}_modules_{kd}"].append(sd[f"unet_lora_{src}_modules_{kd}"][0])
        return kind, sd, True
    if kind == "nonfinite":
        key = draw(st.sampled_from(TENSOR_KEYS))
        t = sd["state_dict_unet"][key]
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return kind, sd, True
    if kind == "whole":
        return kind, draw(st.one_of(junk, special)), True
    if kind == "list_item":
        lk = draw(st.sampled_from(LIST_KEYS))
        sd[lk] = [draw(st.one_of(junk, special))]
        return kind, sd, True
    key = draw(st.one_of(st.integers(), st.tuples(st.integers(), st.integers()), st.binary(max_size=8)))
    sd["state_dict_unet"][key] = torch.zeros(2, 2)
    return kind, sd, True


@SETTINGS
@given(single_mutation())
def test_fuzz_dict_single_mutation(case):
    kind, sd, must_refuse = case
    COUNTS["dict_single"][f"kind:{kind}"] += 1
    outcome("dict_single", "fuzz_case.pkl", lambda: parse_release_dict(sd, "fuzz_case.pkl"), must_refuse)


# ------------------------------------------------------------------------------------------------ file properties
PKL = torch_save_bytes(BASE)
PKL16 = torch_save_bytes(small_release_dict(dtype=torch.float16, seed=1))
ST = conversion_bytes(BASE)
PKL_ENTRY = next(v for k, v in zip_entries(PKL).items() if k.endswith("/data.pkl"))
FILES = {"pkl": (PKL, ".pkl"), "pkl16": (PKL16, ".pt"), "safetensors": (ST, ".safetensors")}


@SETTINGS
@given(st.sampled_from(sorted(FILES)), st.data())
def test_fuzz_truncated_files(which, data):
    raw, ext = FILES[which]
    cut = data.draw(st.integers(0, len(raw) - 1))
    load_bytes("truncated", raw[:cut], ext, must_refuse=True)


@SETTINGS
@given(st.sampled_from(sorted(FILES)), st.data())
def test_fuzz_bit_flips(which, data):
    raw, ext = FILES[which]
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) * 8 - 1))
        buf[i // 8] ^= 1 << (i % 8)
    load_bytes("bit_flips", bytes(buf), ext, must_refuse=False)  # a flip in padding or a timestamp is harmless


def _st_prefix(n: int) -> bytes:
    return struct.pack("<Q", n) + b"{"


@SETTINGS
@given(st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", _st_prefix(10), _st_prefix(2**63),
                        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."]),
       st.binary(max_size=4096), st.sampled_from([".pkl", ".pt", ".pth", ".ckpt", ".bin", ".safetensors"]))
def test_fuzz_random_bytes(prefix, body, ext):
    load_bytes("random_bytes", prefix + body, ext, must_refuse=True)


DANGEROUS = [("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"), ("builtins", "exec"),
             ("__builtin__", "eval"), ("subprocess", "Popen"), ("subprocess", "check_output"),
             ("builtins", "__import__"), ("shutil", "rmtree"), ("torch", "load"), ("pickle", "loads"),
             ("torch.storage", "_load_from_bytes"), ("numpy.core.multiarray", "_reconstruct"),
             ("builtins", "getattr"), ("torch._utils", "_rebuild_tensor"), (__name__, "canary"),
             ("torch.serialization", "_get_layout"), ("collections", "Counter"), ("builtins", "set")]


def _payload(module: str, name: str) -> str:
    if name in ("eval", "exec"):
        return f"open({MARKER!r}, 'w').close()"
    if name == "system":
        return f"touch {MARKER}"
    return MARKER


@st.composite
def code_pickle(draw):
    """(bytes, target name, expects the code refusal wording)."""
    module, name = draw(st.sampled_from(DANGEROUS))
    arg = Op.str(_payload(module, name))
    how = draw(st.sampled_from(["global_reduce", "stack_global", "inst", "obj", "newobj", "in_release_dict",
                                "as_storage_type", "in_persistent_id", "ext"]))
    glob = Op.glob(module, name)
    if how == "stack_global":
        short = lambda s: b"\x8c" + bytes([len(s.encode())]) + s.encode()  # noqa: E731  SHORT_BINUNICODE
        body = b"\x80\x04" + short(module) + short(name) + b"\x93" + Op.tuple([arg]) + Op.REDUCE
    elif how == "inst":
        body = Op.PROTO + Op.MARK + arg + b"i" + f"{module}\n{name}\n".encode()
    elif how == "obj":
        body = Op.PROTO + Op.MARK + glob + arg + b"o"
    elif how == "newobj":
        body = Op.PROTO + glob + Op.tuple([arg]) + b"\x81"
    elif how == "in_release_dict":
        body = Op.PROTO + Op.DICT + Op.MARK + Op.str("lora_rank_unet_pix") + glob + Op.tuple([arg]) + Op.REDUCE + \
            Op.str("state_dict_unet") + Op.DICT + Op.SETITEMS
    elif how == "as_storage_type":
        pid = Op.tuple([Op.str("storage"), glob, Op.str("0"), Op.str("cpu"), Op.int(1)])
        body = Op.PROTO + pid + Op.BINPERSID
    elif how == "in_persistent_id":
        body = Op.PROTO + Op.tuple([Op.str("storage"), glob + Op.tuple([arg]) + Op.REDUCE]) + Op.BINPERSID
    elif how == "ext":
        body = Op.PROTO + b"\x82\x01" + Op.tuple([arg]) + Op.REDUCE  # EXT1: the copyreg registry (empty)
    else:
        body = Op.PROTO + glob + Op.tuple([arg]) + Op.REDUCE
    data = body + Op.STOP
    if draw(st.booleans()):  # inside a torch zip as data.pkl, or a bare pickle file
        data = make_zip({"archive/data.pkl": data, "archive/version": b"3\n", "archive/data/0": b"\0\0\0\0"})
    return data, f"{module}.{name}", how not in ("ext",)


@SETTINGS
@given(code_pickle(), st.sampled_from([".pkl", ".pt", ".pth", ".ckpt", ".bin"]))
def test_fuzz_pickles_that_would_run_code(case, ext):
    data, target, code_wording = case
    msg = load_bytes("code_pickles", data, ext, must_refuse=True)
    if code_wording:  # the refusal names the object and points to the conversion
        assert target in msg and "pisa_sr.convert" in msg, msg


@st.composite
def tensor_lie(draw):
    """A tamper function for hand_torch_zip: one tensor's declaration or record lies."""
    target = draw(st.sampled_from(TENSOR_KEYS))
    what = draw(st.sampled_from(["numel", "size", "stride", "offset", "record", "all"]))
    big = st.one_of(st.integers(-5, 2**20), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, 2**64, -2**63]))
    numel_f = draw(st.sampled_from(["keep", "mul", "add", "set"]))
    mul, add, setv = draw(st.integers(0, 10**6)), draw(st.integers(-3, 3)), draw(big)
    size = tuple(draw(st.lists(st.one_of(st.integers(0, 40), big), min_size=0, max_size=6)))
    stride = tuple(draw(st.lists(st.one_of(st.integers(0, 40), big), min_size=len(size), max_size=len(size))))
    offset = draw(big)
    rec_cut = draw(st.integers(0, 64))
    rec_pad = draw(st.binary(max_size=64))

    def tamper(name, numel, sz, sd, off, record):
        if name != target:
            return numel, sz, sd, off, record
        if what in ("numel", "all"):
            numel = {"keep": numel, "mul": numel * mul, "add": numel + add, "set": setv}[numel_f]
        if what in ("size", "all"):
            sz, sd = size, stride
        if what == "stride":
            sd = stride if len(stride) == len(sz) else sd[::-1]
        if what in ("offset", "all"):
            off = offset
        if what in ("record", "all"):
            record = record[:max(0, len(record) - rec_cut)] + rec_pad
        return numel, sz, sd, off, record

    return tamper


@SETTINGS
@given(tensor_lie())
def test_fuzz_lying_tensor_declarations_in_torch_zips(tamper):
    # A lie that survived the pre-load checks would make torch.load(mmap=True) read outside the map: a crash here.
    try:
        data = hand_torch_zip(BASE, tamper)
    except (OverflowError, struct.error, ValueError):  # the builder cannot encode the lie (e.g. >64-bit int)
        return
    load_bytes("tensor_lies", data, ".pkl", must_refuse=False)  # some lies are consistent (e.g. a permuted stride)


ST_N = struct.unpack("<Q", ST[:8])[0]
ST_HEADER = json.loads(ST[8:8 + ST_N])
ST_DATA = ST[8 + ST_N:]
ST_TENSORS = sorted(k for k in ST_HEADER if k != "__metadata__")
json_junk = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                                   st.floats(allow_nan=False), st.text(max_size=20)),
                         lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                         max_leaves=10)
ints = st.one_of(st.integers(-3, 3000), st.sampled_from([2**31, 2**53, 2**63, 2**64 + 1, -2**63, 10**30]))


@st.composite
def lying_safetensors(draw):
    header = copy.deepcopy(ST_HEADER)
    meta = header["__metadata__"]
    what = draw(st.sampled_from(["length", "dtype", "shape", "offsets", "entry_fields", "extra_entry", "no_meta",
                                 "meta_value", "deep_json", "not_object", "bad_utf8", "truncated_json", "swap",
                                 "overlap"]))
    key = draw(st.sampled_from(ST_TENSORS))
    raw_header = None
    length = None
    if what == "length":
        length = draw(st.one_of(st.integers(0, 2 * ST_N), st.sampled_from([2**63, 2**64 - 1, 2**32, 9 * 1024**2])))
    elif what == "dtype":
        header[key]["dtype"] = draw(st.one_of(st.sampled_from(["F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "",
                                                               "f32", "C64"]), json_junk))
    elif what == "shape":
        header[key]["shape"] = draw(st.one_of(st.lists(ints, max_size=6), json_junk))
    elif what == "offsets":
        header[key]["data_offsets"] = draw(st.one_of(st.lists(ints, min_size=2, max_size=2), json_junk))
    elif what == "entry_fields":
        if draw(st.booleans()):
            del header[key][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        else:
            header[key]["extra"] = draw(json_junk)
    elif what == "extra_entry":
        header[draw(st.text(max_size=30).filter(lambda k: k not in header))] = draw(
            st.one_of(json_junk, st.fixed_dictionaries({"dtype": st.just("F32"), "shape": st.just([1, 1]),
                                                        "data_offsets": st.just([0, 4])})))
    elif what == "no_meta":
        del header["__metadata__"]
    elif what == "meta_value":
        mk = draw(st.sampled_from(sorted(meta)))
        meta[mk] = draw(st.one_of(st.text(max_size=30), st.sampled_from(["9" * 5000, "-1", "0", "300", "[", "[[]]",
                                                                         '["conv_in"]', "null", "2.0"]), json_junk))
    elif what == "deep_json":
        depth = draw(st.integers(100, 200_000))
        raw_header = b'{"__metadata__":' + b"[" * depth + b"]" * depth + b"}"
    elif what == "not_object":
        raw_header = json.dumps(draw(json_junk)).encode()
    elif what == "bad_utf8":
        raw_header = json.dumps(header).encode()[:-3] + b"\xff\xfe}"
    elif what == "truncated_json":
        full = json.dumps(header).encode()
        raw_header = full[:draw(st.integers(0, len(full) - 1))]
    elif what == "swap":
        a, b = draw(st.sampled_from(ST_TENSORS)), key
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif what == "overlap":
        other = draw(st.sampled_from(ST_TENSORS))
        header[key]["data_offsets"] = list(header[other]["data_offsets"])
    blob = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    n = len(blob) if length is None else length
    return what, struct.pack("<Q", n) + blob + ST_DATA


@SETTINGS
@given(lying_safetensors())
def test_fuzz_safetensors_with_lying_headers(case):
    what, data = case
    COUNTS["safetensors_lies"][f"kind:{what}"] += 1
    load_bytes("safetensors_lies", data, ".safetensors", must_refuse=False)  # e.g. swapping equal-size spans


# ------------------------------------------------------------------------------------------------ parser differentials
@st.composite
def hidden_pickle(draw):
    """A pickle for the entry torch's reader picks over the genuine one: code, a hashing bomb, or a shared DAG."""
    what = draw(st.sampled_from(["code", "dag_key", "dag_value", "junk"]))
    if what == "code":
        module, name = draw(st.sampled_from(DANGEROUS))
        return Op.PROTO + Op.glob(module, name) + Op.tuple([Op.str(_payload(module, name))]) + Op.REDUCE + Op.STOP
    if what == "dag_key":
        return dag_key_pickle(draw(st.integers(9, 120)))
    if what == "dag_value":
        return Op.PROTO + Op.DICT + Op.str("state_dict_unet") + shared_structure(draw) + b"s" + Op.STOP
    return Op.PROTO + draw(st.binary(max_size=600)) + Op.STOP


@SETTINGS
@given(st.sampled_from(sorted(DIFFERENTIAL)), hidden_pickle())
def test_fuzz_archive_differentials(family, payload):
    """Whatever entry torch's zip reader picks, that pickle is scanned: each of these must be refused, fast."""
    assume(len(payload) <= len(PKL_ENTRY))  # the prepended archive mirrors the genuine one's layout
    load_bytes("differentials", DIFFERENTIAL[family](payload), ".pkl", must_refuse=True)


# ------------------------------------------------------------------------------------------------ shared structures
def shared_structure(draw) -> bytes:
    """Opcodes leaving one tuple on the stack whose levels each reference earlier levels many times (a DAG): deep
    and narrow (exponential to hash, print or copy) or shallow and wide."""
    out = Op.MARK + draw(st.sampled_from([Op.EMPTY_TUPLE, Op.LIST, Op.str("k"), Op.int(1)])) + b"q\x00"
    levels, fan = draw(st.sampled_from([(st.integers(8, 90), st.integers(2, 3)), (st.integers(2, 5),
                                                                                   st.integers(20, 600))]))
    for i in range(1, min(draw(levels), 250)):
        refs = [b"h" + bytes([draw(st.integers(max(0, i - 2), i - 1))]) for _ in range(draw(fan))]
        kind = draw(st.sampled_from(["tuple", "list", "dict"]))
        if kind == "tuple":
            body = Op.MARK + b"".join(refs) + Op.TUPLE
        elif kind == "list":
            body = Op.LIST + Op.MARK + b"".join(refs) + Op.APPENDS
        else:
            body = Op.DICT + Op.MARK + b"".join(Op.str(f"k{j}") + r for j, r in enumerate(refs)) + Op.SETITEMS
        out += body + b"q" + bytes([i])
    return out + Op.TUPLE  # every level, in one tuple


@SETTINGS
@given(st.data(), st.sampled_from(["key", "value", "list_item", "tensor_args"]))
def test_fuzz_shared_structures(data, where):
    """Memo sharing that makes an object exponentially large to hash, print or copy is refused before loading."""
    dag = shared_structure(data.draw)
    body = {"key": Op.DICT + dag + Op.int(1) + b"s",
            "value": Op.DICT + Op.str("state_dict_unet") + dag + b"s",
            "list_item": Op.DICT + Op.str("unet_lora_encoder_modules_pix") + Op.LIST + dag + b"a" + b"s",
            "tensor_args": Op.glob("torch._utils", "_rebuild_tensor_v2") + Op.MARK + dag + Op.TUPLE + Op.REDUCE}[where]
    load_bytes("shared_structures", pickle_zip(Op.PROTO + body + Op.STOP), ".pkl", True)


# ------------------------------------------------------------------------------------------------ fixed adversaries
HUGE_MEMO = Op.PROTO + Op.DICT + b"r\xff\xff\xff\xff" + Op.STOP
FIXED = {
    "too_many_entries": make_zip({**{f"archive/data/{i}": b"" for i in range(ckpt.MAX_TENSORS + 65)},
                                  "archive/data.pkl": Op.PROTO + Op.DICT + Op.STOP}),
    "huge_pickle": pickle_zip(Op.PROTO + Op.str("x" * (ckpt.MAX_PICKLE_BYTES + 1)) + Op.STOP),
    # LONG_BINPUT 2**32-1: CPython's C unpickler would size its memo array to 2**33 entries (64 GB).
    "huge_memo_index": pickle_zip(HUGE_MEMO),
    "huge_memo_index_bare": HUGE_MEMO,
    # 4M one-byte EMPTY_LIST opcodes would build ~250 MB of lists in any unpickler; the scan stops at its budget.
    "object_flood": pickle_zip(Op.PROTO + Op.LIST * (20 * MAX_OPS) + Op.STOP),
}


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_adversaries_are_refused(name):
    load_bytes("fixed_adversaries", FIXED[name], ".pkl", must_refuse=True)


def test_dag_bombs_in_dicts_are_refused_quickly():
    """Nested shared lists print (and shared tuples hash) in exponential time: the validator must do neither."""
    bomb = _dag_bomb(60)
    in_tensor = fresh()
    in_tensor["state_dict_unet"][TENSOR_KEYS[0]] = bomb
    places = [bomb, in_tensor, {**fresh(), "unet_lora_decoder_modules_pix": [bomb]}]
    places += [{**fresh(), key: bomb} for key in ("lora_rank_unet_pix", "unet_lora_encoder_modules_sem",
                                                  "state_dict_unet")]
    for sd in places:
        outcome("fixed_adversaries", "dag.pkl", lambda sd=sd: parse_release_dict(sd, "dag.pkl"), True)
