"""Where the tiled VAE parks its full-size maps: in memory on ``device`` while they fit a byte budget, else in
memory-mapped files in a directory. The files are unlinked as they are created (``tempfile.TemporaryFile``; on
Windows deleted when closed), so an error or an interruption leaves nothing behind.

Resident file pages: the tiled VAE calls ``trim`` after every tile step, key/value chunk and attention block, which
drops the pages the process mapped (the kernel writes them back like any file), so what is resident is at most what
one of those touched: per contiguous run read or written, its bytes plus two of the kernel's read fault-around
windows (it maps the cached pages of the 64 KiB-aligned window around a read fault), i.e. for a tile step
``3 x rows x (row bytes + 128 KiB)`` (two maps read over the region's rows, one written; maps are channels-last, so
a row is one run of region width x channels x dtype bytes), for an attention block ``(query block + key chunk) x 3
x channels x dtype bytes + 256 KiB`` (q/k/v interleaved per token). Neither depends on the picture's size. Below
it, maps whose rows are narrower than a window keep fewer pages but more for a wider picture (a window then also maps
the rows between a region's rows: about ``rows x map row bytes``), which is why a small map's count grows with the
picture until it reaches the per-run term (measured, tiny VAE, tile 8: 4.9 MiB at 192 px, 9.6 MiB at 384 px).
"""
from __future__ import annotations

import math
import mmap
import shutil
import tempfile
import weakref

import torch

from .errors import PisaError

GIB, MIB = 1 << 30, 1 << 20


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / MIB:.1f} MiB"


class Parking:
    """Allocator for parked maps: ``budget`` bytes of them in memory on ``device`` (None: no limit), the rest in
    files in ``spill_dir`` (None: refuse instead). ``in_memory``/``peak_in_memory`` count the live in-memory bytes."""

    def __init__(self, device: torch.device | str = "cpu", budget: int | None = None, spill_dir: str | None = None):
        self.device = torch.device(device)
        if budget is not None and self.device.type != "cpu":
            raise ValueError("a budget (with files beyond it) is for host parking; a device parks without one")
        self.budget, self.spill_dir = budget, spill_dir
        self.in_memory = self.peak_in_memory = 0
        self.files = 0  # files made so far (a test and the bench see the bounded path was taken)
        self._maps: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()

    def prepare(self, need: int) -> None:
        """Refuse up front (one line, amount and place) when ``need`` bytes of maps exceed the budget and the rest
        cannot go to disk: no directory, an unwritable one, or too little free space there."""
        if self.budget is None or need <= self.budget:
            return
        over = need - self.budget
        if self.spill_dir is None:
            raise PisaError(f"the tiled VAE needs about {_size(need)} for its full-size maps but its memory budget is "
                            f"{_size(self.budget)}. Raise the budget, lower upscale or the image size.")
        try:
            with tempfile.TemporaryFile(dir=self.spill_dir, prefix="pisa_vae_"):
                pass
            free = shutil.disk_usage(self.spill_dir).free
        except OSError as e:
            raise PisaError(f"the tiled VAE needs to write about {_size(over)} of full-size maps to "
                            f"{self.spill_dir} but cannot ({e.strerror or e}). Make that directory writable or "
                            "raise the VAE's RAM budget.") from None
        if over > free:
            raise PisaError(f"the tiled VAE needs about {_size(over)} of free disk in {self.spill_dir} for its "
                            f"full-size maps (beyond {_size(self.budget)} of RAM) but only {_size(free)} is free "
                            "there. Free disk space, raise the VAE's RAM budget, or lower upscale or the image size.")

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised map: in memory while the budget allows, else file-backed (zero-filled, sparse)."""
        n = math.prod(shape) * dtype.itemsize
        if self.budget is None or self.in_memory + n <= self.budget:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self.in_memory += n
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
            weakref.finalize(t, self._release, n)
            return t
        if self.spill_dir is None:
            raise PisaError(f"the tiled VAE's full-size maps exceed its memory budget of {_size(self.budget)}.")
        with tempfile.TemporaryFile(dir=self.spill_dir, prefix="pisa_vae_") as f:
            f.truncate(n)
            m = mmap.mmap(f.fileno(), n)  # keeps its own handle: the file lives until the map is released
        if hasattr(mmap, "MADV_RANDOM"):  # tiles read a few rows each: no read-ahead
            m.madvise(mmap.MADV_RANDOM)
        t = torch.frombuffer(m, dtype=dtype)  # holds m; m goes when the last view of t does
        # [B, C, H, W] stored channels-last: a tile's region is then a few contiguous runs per row, so the pages it
        # touches are about its own bytes (channel planes would touch a page per row per channel)
        t = t.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1) if len(shape) == 4 else t.view(shape)
        self._maps[id(m)] = m  # weakly: the buffer tensor holds m, so m lives while any view of the map does
        self.files += 1
        del m
        return t

    def trim(self) -> None:
        """Drop the process's resident pages of the file-backed maps (their data stays in the file/page cache)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for m in list(self._maps.values()):
                m.madvise(mmap.MADV_DONTNEED)

    def _release(self, n: int) -> None:
        self.in_memory -= n

    @property
    def mapped(self) -> int:
        """Bytes of live file-backed maps."""
        return sum(len(m) for m in list(self._maps.values()))

