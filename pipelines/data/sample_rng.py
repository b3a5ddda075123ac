"""The augmentation generator of one sample: a function of (seed, epoch, position) only, so a
resumed or re-partitioned epoch (another world size, other workers) draws the same boxes and
flips for every sample as an uninterrupted run.

One counter-based generator (Philox4x64) per loader process, re-keyed per sample: key (seed,
epoch), counter (0, position, 0, 0); each sample's draws advance word 0 of its own counter. Re-keying
costs ~5 us against ~36-46 us for ``np.random.default_rng([seed, epoch, position])`` per sample (a
SeedSequence, a PCG64 and a Generator each time; measured 2026-12-02 on the 2-core dev machine,
benchmarks/loader_overhead.py row (g2) vs (g)).
"""
from __future__ import annotations

import numpy as np

_U64 = (1 << 64) - 1


class SampleRng:
    def __init__(self, seed: int):
        self.seed = seed & _U64
        self._bits = np.random.Philox(key=[self.seed, 0])
        self._generator = np.random.Generator(self._bits)
        self._state = self._bits.state

    def __call__(self, epoch: int, position: int) -> np.random.Generator:
        """The generator for sample ``position`` of ``epoch``, at the start of its stream. The
        previous sample's generator is this same object: use it before asking for the next."""
        state = self._state
        state["state"]["key"][:] = (self.seed, epoch & _U64)
        state["state"]["counter"][:] = (0, position & _U64, 0, 0)
        state["buffer_pos"], state["has_uint32"], state["uinteger"] = 4, 0, 0  # no draws left over
        self._bits.state = state
        return self._generator

    def __getstate__(self):  # to spawned worker processes: the seed is the whole state
        return {"seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["seed"])
