"""Replay memory: the DiT's own errors, banked by timestep, resampled for injection.

Errors are filed into bins by timestep: bin ``i`` collects the errors made at training timesteps
nearest to ``grid[i]``, where ``grid`` is the inference schedule (50 shifted steps by default), so
an error is replayed at the noise level where the sampler would make it. Each bin holds at most
``capacity`` errors. When a bin is full, a new error replaces its nearest (L2) resident, so the
bin keeps a spread of different errors instead of many copies of the common one (``random``
replaces a random resident instead).

Every random choice takes a ``torch.Generator`` so a run is reproducible and resumable.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ReplayMemory:
    """Timestep-binned errors, each bin a tensor ``[n, *shape]`` grown up to ``capacity``."""

    def __init__(self, grid: torch.Tensor, capacity: int = 500, replace: str = "nearest", dtype=torch.bfloat16):
        if replace not in ("nearest", "random"):
            raise ValueError(f"unknown replacement {replace!r}; use nearest or random")
        self.grid = torch.as_tensor(grid, dtype=torch.float32).flatten().cpu()
        self.capacity = int(capacity)
        self.replace = replace
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.shape: tuple[int, ...] | None = None
        self._store: list[torch.Tensor | None] = [None] * len(self.grid)
        self.counts = [0] * len(self.grid)

    # -- structure --------------------------------------------------------------------------------
    @property
    def num_bins(self) -> int:
        return len(self.grid)

    def __len__(self) -> int:
        return sum(self.counts)

    def bin_of(self, timestep: float) -> int:
        """The bin whose grid timestep is nearest to ``timestep``."""
        return int(torch.argmin((self.grid - float(timestep)).abs()))

    def entries(self, index: int) -> torch.Tensor:
        """The errors in bin ``index``, ``[n, *shape]`` (a view: do not modify)."""
        store = self._store[index]
        if store is None:
            return torch.empty(0, *(self.shape or ()), dtype=self.dtype)
        return store[: self.counts[index]]

    # -- banking ----------------------------------------------------------------------------------
    def add(self, error: torch.Tensor, timestep: float, generator: torch.Generator | None = None) -> tuple[int, int]:
        """File ``error`` under ``timestep``; return ``(bin, slot)`` where it landed."""
        error = error.detach().to("cpu", self.dtype)
        if self.shape is None:
            self.shape = tuple(error.shape)
        elif tuple(error.shape) != self.shape:
            raise ValueError(f"error of shape {tuple(error.shape)} does not match the memory's {self.shape}")
        b = self.bin_of(timestep)
        n = self.counts[b]
        if n < self.capacity:
            store = self._store[b]
            if store is None or store.shape[0] == n:  # grow by doubling, up to the capacity
                size = min(self.capacity, max(4, 2 * n))
                grown = torch.empty(size, *self.shape, dtype=self.dtype)
                if n:
                    grown[:n] = store[:n]
                self._store[b] = store = grown
            store[n] = error
            self.counts[b] = n + 1
            return b, n
        slot = self._victim(b, error, generator)
        self._store[b][slot] = error
        return b, slot

    def _victim(self, b: int, error: torch.Tensor, generator: torch.Generator | None) -> int:
        if self.replace == "random":
            return int(torch.randint(self.counts[b], (1,), generator=generator))
        return int(torch.argmin(self.distances(b, error)))

    def distances(self, b: int, error: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """L2 distance from ``error`` to every resident of bin ``b`` (float32, in chunks)."""
        flat = error.detach().to("cpu", torch.float32).flatten()
        stored = self.entries(b)
        out = torch.empty(stored.shape[0])
        for i in range(0, stored.shape[0], chunk):
            block = stored[i : i + chunk].reshape(-1, flat.numel()).float()
            out[i : i + chunk] = (block - flat).pow(2).sum(dim=1).sqrt()
        return out

    # -- replay -----------------------------------------------------------------------------------
    def sample(
        self, timestep: float, generator: torch.Generator | None = None, all_bins: bool = False
    ) -> torch.Tensor | None:
        """A uniformly chosen error from the bin of ``timestep`` (``all_bins``: from every bin),
        as float32; ``None`` when there is none to choose from."""
        if all_bins:
            total = len(self)
            if total == 0:
                return None
            k = int(torch.randint(total, (1,), generator=generator))
            for b, n in enumerate(self.counts):
                if k < n:
                    return self._store[b][k].float()
                k -= n
        b = self.bin_of(timestep)
        n = self.counts[b]
        if n == 0:
            return None
        return self._store[b][int(torch.randint(n, (1,), generator=generator))].float()

    def has(self, timestep: float, all_bins: bool = False) -> bool:
        return len(self) > 0 if all_bins else self.counts[self.bin_of(timestep)] > 0

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors only (for safetensors): the grid and each non-empty bin's residents."""
        out = {f"{prefix}grid": self.grid.clone()}
        for b in range(self.num_bins):
            if self.counts[b]:
                out[f"{prefix}bin.{b}"] = self.entries(b).contiguous().clone()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        grid = tensors[f"{prefix}grid"]
        if grid.shape != self.grid.shape or not torch.allclose(grid, self.grid):
            raise ValueError("the saved replay memory was made for another timestep grid")
        self.shape = None
        self._store = [None] * self.num_bins
        self.counts = [0] * self.num_bins
        for b in range(self.num_bins):
            stored = tensors.get(f"{prefix}bin.{b}")
            if stored is None:
                continue
            if stored.shape[0] > self.capacity:
                raise ValueError(f"saved bin {b} holds {stored.shape[0]} errors, more than the capacity {self.capacity}")
            self.shape = tuple(stored.shape[1:])
            n = stored.shape[0]
            store = torch.empty(min(self.capacity, max(4, 2 * n)), *self.shape, dtype=self.dtype)
            store[:n] = stored.to(self.dtype)
            self._store[b] = store
            self.counts[b] = n
