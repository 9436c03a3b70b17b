"""masking_generator.py: exact counts, every placed block checked against the proposal rules, full coverage of the
grid, reproducible draws and the argument errors."""
import math

import numpy as np
import pytest
from scipy import stats

from masking_generator import MAX_FAILED_ROUNDS, PROPOSALS_PER_ROUND, MaskingGenerator, masked_positions

# (input_size, num_masking_patches, other arguments, draws)
SETTINGS = {
    'zoo 14x14': (14, 75, {'min_num_patches': 16}, 2000),
    'non-square 7x10': ((7, 10), 30, {}, 500),
    'wide 6x12, capped blocks': ((6, 12), 40, {'max_num_patches': 12}, 500),
    'tall 12x5, narrow aspects': ((12, 5), 25, {'min_aspect': 0.5, 'max_aspect': 4.0}, 500),
    'tiny 4x4': (4, 6, {}, 500),
    'tiny 4x4, all cells': (4, 16, {}, 300),
    'small 8x8': (8, 20, {}, 500),
    'small 8x8, big blocks': (8, 40, {'min_num_patches': 16}, 500),
}


def _generator(setting: str, seed: int = 0) -> tuple[MaskingGenerator, int]:
    size, count, kwargs, draws = SETTINGS[setting]
    return MaskingGenerator(size, count, rng=np.random.default_rng(seed), **kwargs), draws


def _grid(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


@pytest.mark.parametrize('setting', sorted(SETTINGS))
def test_count_is_exact_and_every_cell_gets_masked(setting):
    gen, draws = _generator(setting)
    size, count = SETTINGS[setting][:2]
    hits = np.zeros(_grid(size), dtype=np.int64)
    for _ in range(draws):
        mask = gen()
        assert mask.shape == _grid(size) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == count
        hits += mask
    assert hits.min() > 0, f'cells never masked in {draws} draws:\n{(hits == 0).astype(int)}'


def _recording(gen: MaskingGenerator) -> list:
    """Make ``gen`` log every proposal it draws, with the budget it was drawn for."""
    log = []
    propose = gen.propose_block

    def record(budget, rng):
        block = propose(budget, rng)
        log.append((block, budget))
        return block

    gen.propose_block = record
    return log


def _check_proposal(gen: MaskingGenerator, block, budget: int) -> None:
    """The draws of a proposal lie in the ranges the paper gives, and its sides are their roundings."""
    low, high = sorted((gen.min_num_patches, budget))
    assert low <= block.target_area <= high
    assert gen.min_aspect * (1 - 1e-12) <= block.aspect <= gen.max_aspect * (1 + 1e-12)
    assert block.height == round(math.sqrt(block.target_area * block.aspect))
    assert block.width == round(math.sqrt(block.target_area / block.aspect))


@pytest.mark.parametrize('setting', sorted(SETTINGS))
def test_mask_is_the_union_of_accepted_proposals(setting):
    """Replay the logged proposals: each block placed follows the rules, and together they make the mask."""
    gen, draws = _generator(setting, seed=1)
    log = _recording(gen)
    for _ in range(min(draws, 300)):
        log.clear()
        mask = gen()
        rebuilt = np.zeros_like(mask)
        for block, budget in log:
            _check_proposal(gen, block, budget)
            assert budget == min(gen.num_masking_patches - int(rebuilt.sum()), gen.max_num_patches)
            if block.height >= gen.height or block.width >= gen.width:
                continue  # a block as high or as wide as the grid is never placed
            assert 0 <= block.top <= gen.height - block.height and 0 <= block.left <= gen.width - block.width
            window = rebuilt[block.top:block.top + block.height, block.left:block.left + block.width]
            new_cells = int((window == 0).sum())
            if 0 < new_cells <= budget:
                window[...] = 1
        np.testing.assert_array_equal(rebuilt, mask)


def test_proposals_follow_their_distributions():
    """Area uniform, aspect log-uniform, corners uniform over every position where the block fits."""
    gen = MaskingGenerator((9, 11), 60, min_num_patches=6, min_aspect=0.4)
    rng = np.random.default_rng(2)
    blocks = [gen.propose_block(30, rng) for _ in range(4000)]
    areas = np.array([b.target_area for b in blocks])
    log_aspects = np.log([b.aspect for b in blocks])
    assert stats.kstest(areas, stats.uniform(6, 24).cdf).pvalue > 1e-3
    log_low, log_high = math.log(0.4), math.log(2.5)
    assert stats.kstest(log_aspects, stats.uniform(log_low, log_high - log_low).cdf).pvalue > 1e-3
    for block in blocks:
        _check_proposal(gen, block, 30)
    fitting = [b for b in blocks if b.height < 9 and b.width < 11]
    for side, grid_side, corner in (('height', 9, 'top'), ('width', 11, 'left')):
        by_length = {}
        for b in fitting:
            by_length.setdefault(getattr(b, side), set()).add(getattr(b, corner))
        for length, corners in by_length.items():
            if sum(getattr(b, side) == length for b in fitting) >= 200:
                assert corners == set(range(grid_side - length + 1)), (side, length)


def test_budget_below_the_minimum_draws_areas_between_them():
    gen = MaskingGenerator(14, 75, min_num_patches=16)
    rng = np.random.default_rng(3)
    areas = [gen.propose_block(5, rng).target_area for _ in range(500)]
    assert min(areas) >= 5 and max(areas) <= 16 and max(areas) - min(areas) > 9


def test_same_rng_seed_same_masks_and_default_follows_numpys_global_seed():
    def masks(gen, n=20):
        return np.stack([gen() for _ in range(n)])

    first = masks(MaskingGenerator(14, 75, 16, rng=np.random.default_rng(7)))
    np.testing.assert_array_equal(first, masks(MaskingGenerator(14, 75, 16, rng=np.random.default_rng(7))))
    assert not np.array_equal(first, masks(MaskingGenerator(14, 75, 16, rng=np.random.default_rng(8))))
    unseeded = MaskingGenerator(14, 75, 16)
    np.random.seed(0)  # what Paddle's DataLoader does in each worker, with the worker's own seed
    worker_0 = masks(unseeded)
    np.random.seed(0)
    np.testing.assert_array_equal(worker_0, masks(unseeded))
    np.random.seed(1)
    assert not np.array_equal(worker_0, masks(unseeded))


def test_unreachable_count_gives_a_short_mask_after_the_rounds_run_out():
    """On a 2x2 grid blocks must be 1x1, which a target area of 4 never rounds to: nothing can be placed."""
    gen = MaskingGenerator(2, 4, min_num_patches=4, rng=np.random.default_rng(0))
    log = _recording(gen)
    mask = gen()
    assert mask.sum() == 0
    assert len(log) == MAX_FAILED_ROUNDS * PROPOSALS_PER_ROUND


def test_masked_positions_list_the_mask_row_major_then_pad_a_short_one():
    mask = np.array([[0, 1, 0], [1, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(masked_positions(mask, 3), [1, 3, 5])
    padded = masked_positions(mask, 5)
    assert padded.dtype == np.int64 and padded.tolist() == [1, 3, 5, 0, 0]
    assert masked_positions(np.zeros((2, 2), bool), 2).tolist() == [0, 0]
    with pytest.raises(ValueError, match='the mask has 3 masked cells, more than the 2 positions shipped'):
        masked_positions(mask, 2)


def test_max_aspect_defaults_to_the_inverse_of_min_aspect():
    gen = MaskingGenerator((3, 5), 4, min_aspect=0.25)
    assert (gen.height, gen.width, gen.max_num_patches, gen.max_aspect) == (3, 5, 4, 4.0)


def test_repr_states_the_settings():
    text = repr(MaskingGenerator((14, 12), 75, min_num_patches=16, max_num_patches=40, min_aspect=0.3))
    assert text == ('MaskingGenerator(input_size=(14, 12), num_masking_patches=75, min_num_patches=16, '
                    'max_num_patches=40, min_aspect=0.3, max_aspect=3.333)')


@pytest.mark.parametrize('args, kwargs, message', [
    ((14, 197), {}, r'num_masking_patches must lie in \[1, 196\]'),
    (((4, 5), 21), {}, r'num_masking_patches must lie in \[1, 20\] for a 4x5 grid'),
    ((14, 0), {}, 'num_masking_patches must lie in'),
    ((14, 75), {'min_num_patches': 76}, 'min_num_patches <= max_num_patches, got 76 and 75'),
    ((14, 75), {'min_num_patches': 20, 'max_num_patches': 10}, 'got 20 and 10'),
    ((14, 75), {'min_num_patches': 0}, 'need 1 <= min_num_patches'),
    ((14, 75), {'min_aspect': 0}, 'need 0 < min_aspect <= max_aspect'),
    ((14, 75), {'min_aspect': -0.3, 'max_aspect': 2.0}, 'need 0 < min_aspect'),
    ((14, 75), {'min_aspect': 2.0, 'max_aspect': 1.0}, 'got 2.0 and 1.0'),
    ((14, 75), {'min_aspect': 0.5, 'max_aspect': 0.0}, 'need 0 < min_aspect <= max_aspect'),
    (((1, 20), 5), {}, 'a 1x20 grid has no room for a block'),
    ((0, 1), {}, 'input_size must be a positive int or'),
    (((14, 14, 3), 75), {}, 'input_size must be'),
    ((14.0, 75), {}, 'input_size must be'),
])
def test_bad_arguments_are_refused(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskingGenerator(*args, **kwargs)
