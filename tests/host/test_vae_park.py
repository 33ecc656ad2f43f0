"""The tiled VAE within a host-memory budget (pisa_sr.park): maps beyond the budget go to memory-mapped temp files.

Same tiny random autoencoders as tests/host/test_vae_tiled.py, CPU, fp32. The bounded path must give bit-identical
output to the unlimited one (same tiles, same arithmetic, only where the maps live differs), stay within its budget
plus one tile's working set, leave no file or mapping behind after an interruption, and refuse up front (one line,
amount and place) when the disk cannot take the spill.
"""
from __future__ import annotations

import functools
import gc
import re

import pytest
import torch

from pisa_sr import park, vae_tiled
from pisa_sr.errors import PisaError
from pisa_sr.park import Parking
from pisa_sr.vae_tiled import parked_bytes, tiled_decode, tiled_encode
from test_vae_tiled import FP32_REL, Stop, _LiveBytes, _latent, _smooth_image, _stop_after, _tiny_vae
from test_vae_tiled import _one_thread  # noqa: F401  (its autouse fixture: one intra-op thread here too)

MIB = 1 << 20
# the two slow spill tests (~95 s) run on the first host only
SPILL_ONCE = pytest.mark.one_host("pisa_sr.park only moves maps between RAM and files; the host's modules are walked "
                                  "the same way bounded or not, and test_vae_tiled.py checks the walk on each host")


@pytest.fixture(scope="module")
def ae():
    return _tiny_vae(21, attn_resolutions=[32]).first_stage_model  # attention in a level too (keys/values parked)


def _mapped_resident(directory) -> int:
    """Resident bytes of this process's mappings of files in ``directory`` (unlinked ones included)."""
    total, inside = 0, False
    prefix = str(directory)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = len(head) >= 6 and head[5].startswith(prefix)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def _mappings(directory) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(directory) in line for line in f)


class _HostBytes(_LiveBytes):
    """Peak live tensor bytes (file-backed maps are views of a buffer, not allocations, so not counted) and peak
    resident pages of the spill files, sampled before every ``Parking.trim``: pages only accumulate between trims,
    and the tiled VAE trims after every tile step, key/value chunk and attention block."""

    def __init__(self, h: int, w: int, directory):
        super().__init__(h, w)
        self.directory, self.peak_live, self.peak_mapped = directory, 0, 0
        self._trim = Parking.trim

    def __enter__(self):
        def trim(parking):
            self.peak_mapped = max(self.peak_mapped, _mapped_resident(self.directory))
            self._trim(parking)
        Parking.trim = trim
        return super().__enter__()

    def __exit__(self, *exc):
        Parking.trim = self._trim
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.peak_live = max(self.peak_live, self.now)
        return out


# Read faults on a file mapping also map the cached pages around them (the kernel's fault-around, 64 KiB): a tile
# row of a few KiB (tiny models) maps up to two such windows. Real tiles' rows are larger than that (a 256 px row of
# 128 fp32 channels is 128 KiB), where it adds at most a window per row.
FAULT_AROUND = 64 << 10


def _bounded_run(run, h: int, w: int, directory, budget: int):
    bounded = Parking(budget=budget, spill_dir=str(directory))
    with _HostBytes(h, w, directory) as mem:
        out = run(parking=bounded)
    assert bounded.files > 0 and bounded.peak_in_memory <= budget  # the bounded path was taken
    return out, mem


@SPILL_ONCE
def test_small_budget_spills_to_files_and_equals_unlimited(ae, tmp_path):
    z, x = _latent(32, 32, seed=22), _smooth_image(1, 256, 256, seed=23)
    budget = 2 * MIB  # the maps need ~26 MiB (decode) here
    assert parked_bytes(32, 32, is_decoder=True, dtype_bytes=4, base_channels=32) > 10 * budget
    with torch.no_grad():
        refs = ae.decode(z), ae.encode(x)
    tile_set = vae_tiled._tile_bytes(8, is_decoder=True, dtype_bytes=4, base_channels=32)  # 8 latent = 64 px
    rows = 8 * 8 + 2 * vae_tiled.HALO  # rows of the largest region a tile reads (top level)
    touched = 3 * rows * 2 * FAULT_AROUND  # two input maps read, one written
    for run, ref in ((lambda **k: tiled_decode(ae, z, 8, whole_mid=False, **k), refs[0]),
                     (lambda **k: tiled_encode(ae, x, 64, whole_mid=False, **k), refs[1])):
        unlimited = run()
        out, mem = _bounded_run(run, 32, 32, tmp_path, budget)
        assert torch.equal(out, unlimited)  # bit-identical: only where the maps live differs
        assert (out - ref).abs().max().item() <= FP32_REL * (ref.max() - ref.min()).item()
        print(f"\n[budget {budget / MIB:.0f} MiB] peak live tensors {mem.peak_live / MIB:.2f} MiB, resident spill "
              f"pages {mem.peak_mapped / MIB:.2f} MiB; one tile's working set {tile_set / MIB:.2f} MiB")
        # host memory it adds: live tensors (in-RAM maps, tile work, the output) <= budget + one tile's working set,
        # plus the spill pages one tile touches
        assert mem.peak_live <= budget + tile_set
        assert 0 < mem.peak_mapped <= touched
        del out
        gc.collect()
        assert _mappings(tmp_path) == 0 and list(tmp_path.iterdir()) == []


def test_interrupt_leaves_no_file_and_next_run_works(ae, tmp_path):
    z = _latent(32, 32, seed=24)
    first = tiled_decode(ae, z, 8, parking=Parking(budget=MIB, spill_dir=str(tmp_path)))
    steps = []
    tiled_decode(ae, z, 8, progress=lambda d, t: steps.append(t))
    for k in (3, steps[-1] // 2):
        calls = []
        with pytest.raises(Stop):
            tiled_decode(ae, z, 8, parking=Parking(budget=MIB, spill_dir=str(tmp_path)),
                         progress=lambda d, t: calls.append(d), check_interrupt=_stop_after(k))
        assert calls[-1] == k  # stopped before the next tile (within one step)
        gc.collect()  # the traceback pytest kept is gone: its frames held the maps
        assert _mappings(tmp_path) == 0 and list(tmp_path.iterdir()) == []
    assert torch.equal(tiled_decode(ae, z, 8, parking=Parking(budget=MIB, spill_dir=str(tmp_path))), first)


def _one_line(e: PisaError) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


def test_refuses_up_front_without_disk_space(ae, tmp_path, monkeypatch):
    z = _latent(32, 32, seed=25)
    need = parked_bytes(32, 32, is_decoder=True, dtype_bytes=4, base_channels=32) - MIB
    monkeypatch.setattr(park.shutil, "disk_usage", lambda p: type("U", (), {"free": need // 2})())
    started = []
    with pytest.raises(PisaError) as e:
        tiled_decode(ae, z, 8, parking=Parking(budget=MIB, spill_dir=str(tmp_path)),
                     check_interrupt=lambda: started.append(1))
    msg = _one_line(e.value)
    assert f"{park._size(need)} of free disk in {tmp_path}" in msg and "raise the VAE's RAM budget" in msg
    assert started == [] and list(tmp_path.iterdir()) == [] and _mappings(tmp_path) == 0


def test_refuses_up_front_an_unwritable_directory(ae, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    where = blocker / "temp"  # under a regular file: cannot exist, whoever runs the test
    x = _smooth_image(1, 256, 256, seed=26)
    with pytest.raises(PisaError) as e:
        tiled_encode(ae, x, 64, parking=Parking(budget=MIB, spill_dir=str(where)))
    msg = _one_line(e.value)
    need = parked_bytes(256, 256, is_decoder=False, dtype_bytes=4, base_channels=32) - MIB
    assert f"about {park._size(need)}" in msg and str(where) in msg and "writable" in msg
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_budget_without_directory_refuses(ae):
    with pytest.raises(PisaError, match="memory budget"):
        tiled_decode(ae, _latent(32, 32, seed=27), 8, parking=Parking(budget=MIB))


def test_plan_budgets_tile_and_maps_together():
    """nodes.vae_ops.plan: on a GPU the tile and device-parked maps fit the free memory together, else the maps go
    to the host within the budget (never all in RAM); on the CPU working set + in-RAM maps stay within the budget."""
    import host

    vae_ops = host.pack("nodes.vae_ops")
    gib, cuda = 1 << 30, torch.device("cuda")
    kw = {"is_decoder": True, "dtype_bytes": 2, "base_channels": 128}
    small = vae_ops.plan(cuda, 8 * gib, 16 * gib, "/spill", (256, 256), 0, **kw)  # 2048 px on 8 GB: maps 3 GiB
    assert small.tile < 256 and small.parking.device == cuda and small.parking.budget is None
    assert vae_tiled._tiled_peak(small.tile, 256, 256, whole_mid=True, **kw) + parked_bytes(256, 256, **kw) <= 8 * gib
    for w, h in ((960, 540), (1024, 1024)):  # 7680x4320 and 8192 px on a 24 GB card: maps 24 and 48 GiB
        p = vae_ops.plan(cuda, 22 * gib, 16 * gib, "/spill", (w, h), 0, **kw)
        assert p.parking.device.type == "cpu" and p.parking.budget == 16 * gib and p.parking.spill_dir == "/spill"
        assert vae_tiled._tiled_peak(p.tile, w, h, whole_mid=p.whole_mid is not False, **kw) <= 22 * gib
    cpu_kw = {**kw, "dtype_bytes": 4}
    p = vae_ops.plan(torch.device("cpu"), 20 * gib, 4 * gib, "/spill", (256, 256), 0, **cpu_kw)  # 2048 px, fp32
    assert p.whole_mid is False  # the whole-map mid block (~1.9 GiB) does not fit half of the working half
    assert p.parking.budget + vae_tiled._tiled_peak(p.tile, 256, 256, whole_mid=False, **cpu_kw) <= 4 * gib


def test_small_budget_tile_does_not_collapse_for_the_attention():
    """A 4 GiB budget on the CPU (fp32) at 4096 and 8192 px: the tiled mid block's attention streams its keys/values
    within one tile's working set, so the tile is sized by the budget alone, the same at both sizes, and not the
    smallest (when the whole map's keys/values were held, 1.5 GiB at 4096 px, it was 16). Working set + maps in RAM
    stay within the budget."""
    import host

    vae_ops = host.pack("nodes.vae_ops")
    gib, kw = 1 << 30, {"is_decoder": True, "dtype_bytes": 4, "base_channels": 128}
    plans = [vae_ops.plan(torch.device("cpu"), 20 * gib, 4 * gib, "/spill", (side, side), 0, **kw)
             for side in (512, 1024)]
    assert [p.whole_mid for p in plans] == [False, False] and plans[0].tile == plans[1].tile > 16
    p = plans[0]
    assert p.parking.budget + vae_tiled._tiled_peak(p.tile, 512, 512, whole_mid=False, **kw) <= 4 * gib
    tokens = 512 * 512  # the mid block's attention at 4096 px: its keys/values (1 GiB) are read in chunks
    assert vae_tiled.attention_blocks(tokens, 512, 4, vae_tiled._tile_bytes(p.tile, **kw))[1] < tokens
    print(f"\n[4 GiB budget, fp32] tile {p.tile} latent px at 4096 and 8192 px")


def test_streamed_attention_stays_within_budget_and_tile_working_set(ae, tmp_path):
    """A picture whose keys/values (an attention's, 1.3 MiB) outgrow the tile's working set (1.1 MiB): beyond its
    output (the caller's IMAGE) the bounded decode adds at most budget + that working set in live tensors, and its
    output equals the unlimited one."""
    side, tile, budget = 36, 4, 2 * MIB
    z = _latent(side, side, seed=29)
    tile_set = vae_tiled._tile_bytes(tile, is_decoder=True, dtype_bytes=4, base_channels=32)
    assert 2 * side * side * 128 * 4 > tile_set  # 128 channels at the latent-size level and in the mid block
    unlimited = tiled_decode(ae, z, tile, whole_mid=False)
    bounded = Parking(budget=budget, spill_dir=str(tmp_path))
    with _LiveBytes(side, side) as mem:  # live tensors only (the resident pages are the next test's)
        out = tiled_decode(ae, z, tile, whole_mid=False, parking=bounded)
    assert bounded.files > 0 and bounded.peak_in_memory <= budget
    added = mem.peak - out.untyped_storage().nbytes()
    print(f"\n[streamed attention, budget {budget / MIB:.0f} MiB] peak live tensors beyond the output "
          f"{added / MIB:.2f} MiB; tile working set {tile_set / MIB:.2f} MiB")
    assert torch.equal(out, unlimited)
    assert added <= budget + tile_set


def _resident_bound(ae, tile: int, dtype_bytes: int = 4) -> int:
    """park.py's bound on resident spill pages for a decode in tiles of ``tile``: the larger of a tile step's
    ``3 x rows x (row bytes + 2 fault-around windows)`` at the level with the most rows and widest rows, and an
    attention block's ``(query block + key chunk) x 3C x dtype + 4 windows``. Nothing in it is the picture's size."""
    dec = ae.decoder
    rows = tile * 8 + 2 * vae_tiled.HALO  # a region's rows at the top level, the most of any level
    widest = max((tile * 2 ** i + 2 * vae_tiled.HALO) * 3 * m.in_channels * dtype_bytes  # qkv: 3 x the channels
                 for i, lvl in enumerate(reversed(dec.up)) for m in lvl.block)  # conservative: 3x every level's
    work = vae_tiled._tile_bytes(tile, is_decoder=True, dtype_bytes=dtype_bytes, base_channels=dec.conv_out.in_channels)
    c = dec.mid.attn_1.norm.num_channels
    q, kv = vae_tiled.attention_blocks(1 << 40, c, dtype_bytes, work)  # the largest blocks: any picture's are <=
    return max(3 * rows * (widest + 2 * FAULT_AROUND), (q + kv) * 3 * c * dtype_bytes + 4 * FAULT_AROUND)


@SPILL_ONCE
def test_resident_spill_pages_are_bounded_independently_of_the_picture(ae, tmp_path):
    """Peak resident pages of the spill files for two picture sizes (4x the area) with the same tile: both within
    park.py's bound, which does not depend on the picture (on maps this narrow the fault-around windows also map
    the rows between a region's rows, so the smaller picture keeps fewer pages; wider maps reach the bound's term)."""
    bound = _resident_bound(ae, 8)
    peaks = []
    for side in (16, 32):
        run = functools.partial(tiled_decode, ae, _latent(side, side, seed=31), 8, whole_mid=False)
        _, mem = _bounded_run(run, side, side, tmp_path, MIB)
        peaks.append(mem.peak_mapped)
    print(f"\n[resident spill pages, tile 8] 16 latent px: {peaks[0] / MIB:.2f} MiB, 32: {peaks[1] / MIB:.2f} MiB; "
          f"bound {bound / MIB:.2f} MiB")
    assert all(0 < p <= bound for p in peaks)
