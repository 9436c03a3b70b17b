"""Blockwise masking of the patch grid for BEiT's masked image modeling (arXiv 2106.08254, Algorithm 1).

Semantics of the official generator: blocks are drawn one after another, each with a target area uniform
between ``min_num_patches`` and the remaining budget (at most ``max_num_patches``) and an aspect ratio
(height / width) log-uniform in [min_aspect, max_aspect]; height = round(sqrt(area * aspect)),
width = round(sqrt(area / aspect)), both smaller than the grid's sides, at a uniform top-left corner. A block
is accepted only if the cells it newly masks are between 1 and the remaining budget.

One difference, so that every mask has the same count: the official code gives up at the first block that
10 proposals in a row cannot place, which leaves 31% of its 14x14 / 75 / 16 masks short of 75 (measured:
as few as 66). Here the same proposals keep coming, in rounds of 10, until the count is reached; only after
``MAX_FAILED_ROUNDS`` rounds in a row without a placement is the count taken as unreachable and the mask
returned short (never seen with the zoo settings, where at most 20 rounds in a row failed in 20,000 masks).

``masked_positions`` lists a mask's cells for a batch of fixed shape: [num_masking_patches] indices, padded at
the end when a mask is short, so the training step gathers the masked patches without a data-dependent shape.
"""
import math
from typing import NamedTuple

import numpy as np

PROPOSALS_PER_ROUND = 10
MAX_FAILED_ROUNDS = 100


class BlockProposal(NamedTuple):
    """A candidate block and the draws it came from (kept so tests can check them)."""
    top: int
    left: int
    height: int
    width: int
    target_area: float
    aspect: float


class MaskingGenerator:
    """Calling it returns an (H, W) uint8 array of 0/1, with ``num_masking_patches`` ones whenever blocks can
    reach that count.

    ``rng``: a numpy Generator, for reproducible masks. Without one, each call seeds a new Generator from
    numpy's global generator, which Paddle's DataLoader reseeds in every worker and ``utils.seed_everything``
    seeds: one Generator made here would be copied into every worker and give them all the same masks.
    """

    def __init__(self, input_size, num_masking_patches: int, min_num_patches: int = 4, max_num_patches=None,
                 min_aspect: float = 0.3, max_aspect=None, rng: np.random.Generator | None = None):
        self.height, self.width = _grid_shape(input_size)
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        self.min_aspect = min_aspect
        self.max_aspect = 1 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        _validate(self)
        self.log_aspect_range = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.rng = rng

    def __repr__(self) -> str:
        return (f'MaskingGenerator(input_size=({self.height}, {self.width}), '
                f'num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, '
                f'max_num_patches={self.max_num_patches}, min_aspect={self.min_aspect:.4g}, '
                f'max_aspect={self.max_aspect:.4g})')

    def __call__(self) -> np.ndarray:
        rng = self.rng if self.rng is not None else np.random.default_rng(np.random.randint(2**63 - 1, dtype=np.int64))
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        count, failed_rounds = 0, 0
        while count < self.num_masking_patches and failed_rounds < MAX_FAILED_ROUNDS:
            added = self._place_one_block(mask, min(self.num_masking_patches - count, self.max_num_patches), rng)
            count += added
            failed_rounds = 0 if added else failed_rounds + 1
        return mask

    def propose_block(self, budget: int, rng: np.random.Generator) -> BlockProposal:
        """One random block for a remaining budget; its sides may not fit the grid (then it is rejected)."""
        target_area = rng.uniform(*sorted((self.min_num_patches, budget)))
        aspect = math.exp(rng.uniform(*self.log_aspect_range))
        height = round(math.sqrt(target_area * aspect))
        width = round(math.sqrt(target_area / aspect))
        top = int(rng.integers(0, self.height - height + 1)) if height < self.height else 0
        left = int(rng.integers(0, self.width - width + 1)) if width < self.width else 0
        return BlockProposal(top, left, height, width, target_area, aspect)

    def _place_one_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask the first of up to PROPOSALS_PER_ROUND proposals that fits; returns the cells newly masked."""
        for _ in range(PROPOSALS_PER_ROUND):
            block = self.propose_block(budget, rng)
            if block.height >= self.height or block.width >= self.width:
                continue
            window = mask[block.top:block.top + block.height, block.left:block.left + block.width]
            added = window.size - int(np.count_nonzero(window))
            if 0 < added <= budget:
                window[...] = 1
                return added
        return 0


def masked_positions(mask: np.ndarray, count: int) -> np.ndarray:
    """int64 [count]: the row-major flat indices of the masked cells of ``mask``, ascending, then zeros for the
    cells a short mask lacks. Which entries are real follows from the mask: the first ``mask.sum()`` ones."""
    positions = np.flatnonzero(mask)
    if len(positions) > count:
        raise ValueError(f'the mask has {len(positions)} masked cells, more than the {count} positions shipped')
    return np.concatenate([positions, np.zeros(count - len(positions), dtype=positions.dtype)]).astype(np.int64)


def _grid_shape(input_size) -> tuple[int, int]:
    size = (input_size, input_size) if isinstance(input_size, int | np.integer) else input_size
    if not (isinstance(size, tuple | list) and len(size) == 2
            and all(isinstance(side, int | np.integer) and side > 0 for side in size)):
        raise ValueError(f'input_size must be a positive int or (height, width), got {input_size!r}')
    return int(size[0]), int(size[1])


def _validate(gen: MaskingGenerator) -> None:
    num_patches = gen.height * gen.width
    if not 1 <= gen.num_masking_patches <= num_patches:
        raise ValueError(f'num_masking_patches must lie in [1, {num_patches}] for a {gen.height}x{gen.width} grid, '
                         f'got {gen.num_masking_patches}')
    if min(gen.height, gen.width) < 2:
        raise ValueError(f'a {gen.height}x{gen.width} grid has no room for a block: blocks are narrower and '
                         'lower than the grid')
    if not 1 <= gen.min_num_patches <= gen.max_num_patches:
        raise ValueError(f'need 1 <= min_num_patches <= max_num_patches, got {gen.min_num_patches} and '
                         f'{gen.max_num_patches}')
    if not 0 < gen.min_aspect <= gen.max_aspect:
        raise ValueError(f'need 0 < min_aspect <= max_aspect, got {gen.min_aspect} and {gen.max_aspect}')
