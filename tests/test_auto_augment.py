"""RandAugment and AutoAugment against timm: every op pixel-exact, policies draw for draw, statistics."""
import math
import random

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from timm.data import auto_augment as timm_aa

import auto_augment as aa

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR

# ---------------------------------------------------------------------------------------------------- ops


def _timm_op_names() -> set:
    names = set(timm_aa._RAND_TRANSFORMS) | set(timm_aa._RAND_INCREASING_TRANSFORMS)
    for policy in ('original', 'originalr', 'v0', 'v0r'):
        names |= {op.name for sub in timm_aa.auto_augment_policy(policy, {}) for op in sub}
    return names


@pytest.fixture
def timm_posterize_as_with_pillow_10(monkeypatch):
    """Pillow 13 refuses to keep fewer than 1 bit, so timm's posterize ops crash where Pillow 10 returned black (its
    LUT masked every bit): give timm that behaviour back. Patch before building timm ops, which bind their function."""
    def posterize(img, bits, **_):
        return Image.new(img.mode, img.size) if bits <= 0 else timm_aa.posterize(img, bits)

    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        monkeypatch.setitem(timm_aa.NAME_TO_OP, name, posterize)


def test_posterize_to_zero_bits_is_black(small_photos):
    photo = small_photos[0]
    with pytest.raises(ValueError, match='bits must be between'):
        timm_aa.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)(photo)  # the Pillow 13 failure
    for name, magnitude in (('PosterizeIncreasing', 10), ('Posterize', 2)):
        assert not np.asarray(aa.AugmentOp(name, prob=1.0, magnitude=magnitude)(photo)).any()


def test_op_set_is_what_timm_rand_and_auto_augment_use():
    assert set(aa.OP_NAMES) == _timm_op_names()
    assert tuple(timm_aa._RAND_TRANSFORMS) == aa.RAND_OPS
    assert tuple(timm_aa._RAND_INCREASING_TRANSFORMS) == aa.RAND_OPS_INCREASING


@pytest.mark.parametrize('name', sorted(_timm_op_names()))
@pytest.mark.usefixtures('timm_posterize_as_with_pillow_10')
def test_op_equals_timm_at_fixed_magnitude(name, small_photos):
    """prob 1 and no magnitude noise; seeds 0 and 1 draw both signs of the signed ops. Pixel-exact."""
    fill = (124, 116, 104)  # not grey, so a channel mix-up in the fill would show
    changed = 0
    for resample in (BICUBIC, BILINEAR):
        for magnitude, magnitude_max in ((0, 10), (2.5, 10), (5, 10), (7, 10), (9, 10), (10, 10), (13, 15)):
            hparams = {'img_mean': fill, 'interpolation': resample, 'translate_const': 100}
            if magnitude_max != 10:
                hparams['magnitude_max'] = magnitude_max
            theirs = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
            ours = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, magnitude_max=magnitude_max, fill=fill,
                                resample=resample)
            for seed in (0, 1):
                for photo in small_photos:
                    random.seed(seed)
                    expected = np.asarray(theirs(photo))
                    random.seed(seed)
                    result = np.asarray(ours(photo))
                    assert np.array_equal(result, expected), (name, magnitude, seed, resample)
                    changed += not np.array_equal(result, np.asarray(photo))
    assert changed > 0, f'{name} never changed a photo'


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="unknown augment op 'Cutout'"):
        aa.AugmentOp('Cutout')


# ---------------------------------------------------------------------------------------------------- policies


def op_settings(op, timm_op=False) -> tuple:
    if timm_op:
        return op.name, op.prob, op.magnitude, op.magnitude_std, op.magnitude_max or 10
    return op.name, op.prob, op.magnitude, op.magnitude_std, op.magnitude_max


RAND_CONFIGS = ['rand-m9-mstd0.5-inc1', 'rand-m9-mstd0.5', 'rand', 'rand-n3-m7-p0.7-inc1', 'rand-m12-mmax15-mstd2',
                'rand-m6-mstd101-inc0', 'rand-inc1-m5-n1-p1.0']


@pytest.mark.parametrize('config_str', RAND_CONFIGS)
def test_rand_augment_grammar_equals_timm(config_str):
    theirs = timm_aa.rand_augment_transform(config_str, {'img_mean': (128,) * 3})
    ours = aa.rand_augment_from_string(config_str)
    assert ours.num_layers == theirs.num_layers
    assert [op_settings(op) for op in ours.ops] == [op_settings(op, timm_op=True) for op in theirs.ops]


@pytest.mark.parametrize('config_str', ['original', 'originalr', 'v0', 'v0r', 'original-mstd0.5'])
def test_auto_augment_policy_equals_timm(config_str):
    theirs = timm_aa.auto_augment_transform(config_str, {'img_mean': (128,) * 3})
    ours = aa.auto_augment_from_string(config_str)
    assert [[op_settings(op) for op in sub] for sub in ours.policy] == \
           [[op_settings(op, timm_op=True) for op in sub] for sub in theirs.policy]


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize('config_str', ['rand-m9-mstd0.5-inc1', 'rand-m7-n3-mstd101-p0.7', 'rand-m12-mmax15-mstd2',
                                        'original', 'v0r-mstd0.5'])
@pytest.mark.usefixtures('timm_posterize_as_with_pillow_10')
def test_policy_equals_timm_draw_for_draw(config_str, small_photos):
    """Seeded identically, the whole policy (op choice, probability, magnitude noise, sign) gives timm's pixels."""
    hparams = {'img_mean': (128,) * 3, 'interpolation': BICUBIC, 'translate_const': 100}
    if config_str.startswith('rand'):
        theirs = timm_aa.rand_augment_transform(config_str, hparams)
        ours = aa.rand_augment_from_string(config_str)
    else:
        theirs = timm_aa.auto_augment_transform(config_str, hparams)
        ours = aa.auto_augment_from_string(config_str)
    changed = 0
    for seed in range(30):
        for photo in small_photos[:3]:
            seed_all(seed)
            expected = np.asarray(theirs(photo))
            seed_all(seed)
            result = np.asarray(ours(photo))
            assert np.array_equal(result, expected), (config_str, seed)
            changed += not np.array_equal(result, np.asarray(photo))
    assert changed > 30


def _record_our_draws(monkeypatch, policy, draws: int) -> list:
    """Per image, the (op, magnitude or None if skipped) of every op the policy considered; no op runs."""
    records = []
    sample = aa.AugmentOp.sample_magnitude

    def recording_sample(op):
        magnitude = sample(op)
        records[-1].append((op, magnitude))
        return magnitude

    monkeypatch.setattr(aa.AugmentOp, 'sample_magnitude', recording_sample)
    monkeypatch.setattr(aa.AugmentOp, 'apply', lambda op, img, magnitude: img)
    pixel = Image.new('RGB', (1, 1))
    seed_all(1234)
    for _ in range(draws):
        records.append([])
        policy(pixel)
    return records


def _record_timm_draws(policy, ops, draws: int) -> list:
    """The (op name, magnitude) of every op timm applied, in order; timm's ops do not run either."""
    applied = []
    for op in ops:
        op.aug_fn = lambda img, *args, **kwargs: img
        op.level_fn = lambda magnitude, hparams, name=op.name: applied.append((name, magnitude)) or ()
    pixel = Image.new('RGB', (1, 1))
    seed_all(1234)
    for _ in range(draws):
        policy(pixel)
    return applied


def _within(observed: float, expected: float, std_error: float, sigmas: float = 4.0) -> bool:
    return abs(observed - expected) <= sigmas * std_error


def test_rand_augment_statistics(monkeypatch):
    """rand-m9-mstd0.5-inc1 over 20000 seeded images: ops per image ~ Binomial(2, 0.5), ops uniform over the 15,
    magnitudes N(9, 0.5) clipped to [0, 10]; each frequency and moment within 4 standard errors. timm, seeded
    the same way, applies exactly the same ops at exactly the same magnitudes."""
    draws = 20000
    ours = aa.rand_augment_from_string('rand-m9-mstd0.5-inc1')
    records = _record_our_draws(monkeypatch, ours, draws)
    assert all(len(image) == 2 for image in records)
    applied = [(op.name, m) for image in records for op, m in image if m is not None]

    per_image = np.bincount([sum(m is not None for _, m in image) for image in records], minlength=3) / draws
    for count, p in enumerate((0.25, 0.5, 0.25)):
        assert _within(per_image[count], p, math.sqrt(p * (1 - p) / draws)), per_image
    chosen = np.array([aa.RAND_OPS_INCREASING.index(op.name) for image in records for op, _ in image])
    share = np.bincount(chosen, minlength=15) / len(chosen)
    assert np.all(np.abs(share - 1 / 15) <= 4 * math.sqrt((1 / 15) * (14 / 15) / len(chosen))), share

    magnitudes = np.array([m for _, m in applied])
    clipped = stats.norm(9, 0.5)
    mean = clipped.expect(lambda x: min(x, 10.0))
    std = math.sqrt(clipped.expect(lambda x: min(x, 10.0) ** 2) - mean ** 2)
    assert magnitudes.min() >= 0 and magnitudes.max() == 10.0
    assert _within(magnitudes.mean(), mean, std / math.sqrt(len(magnitudes)))
    assert abs(magnitudes.std() - std) <= 0.02 * std
    at_max = clipped.sf(10.0)
    assert _within(np.mean(magnitudes == 10.0), at_max, math.sqrt(at_max * (1 - at_max) / len(magnitudes)))

    theirs = timm_aa.rand_augment_transform('rand-m9-mstd0.5-inc1', {'img_mean': (128,) * 3})
    assert _record_timm_draws(theirs, theirs.ops, draws) == applied


def test_auto_augment_statistics(monkeypatch):
    """'original-mstd0.5' over 25000 seeded images: sub-policies uniform, each op applied with its listed
    probability (4 standard errors; exactly for probabilities 0 and 1); timm seeded the same way applies the
    same ops at the same magnitudes."""
    draws = 25000
    ours = aa.auto_augment_from_string('original-mstd0.5')
    records = _record_our_draws(monkeypatch, ours, draws)
    place = {id(op): (index, position) for index, sub in enumerate(ours.policy) for position, op in enumerate(sub)}
    counts = np.zeros(len(ours.policy))
    hits = np.zeros((len(ours.policy), 2))
    for image in records:
        index = place[id(image[0][0])][0]
        assert [place[id(op)] for op, _ in image] == [(index, 0), (index, 1)]
        counts[index] += 1
        hits[index] += [magnitude is not None for _, magnitude in image]
    share = 1 / len(ours.policy)
    assert np.all(np.abs(counts / draws - share) <= 4 * math.sqrt(share * (1 - share) / draws)), counts
    for index, sub in enumerate(ours.policy):
        for position, op in enumerate(sub):
            rate = hits[index, position] / counts[index]
            assert _within(rate, op.prob, math.sqrt(op.prob * (1 - op.prob) / counts[index])), (index, position)
    applied = [(op.name, m) for image in records for op, m in image if m is not None]
    theirs = timm_aa.auto_augment_transform('original-mstd0.5', {'img_mean': (128,) * 3})
    assert _record_timm_draws(theirs, [op for sub in theirs.policy for op in sub], draws) == applied


@pytest.mark.parametrize(('config_str', 'message'), [
    ('rand-m9-x3', "unknown section 'x3'"),
    ('rand-m9-foo', "unknown section 'foo'"),
    ('rand-m9-tweights', "unknown section 'tweights'"),
    ('rand-m9.5', r"m needs an int, got '9\.5'"),
    ('rund-m9', 'must start with "rand"'),
    ('rand-p1.5', r'p must lie in \[0, 1\]'),
    ('rand-mmax0', 'mmax must be positive'),
])
def test_bad_rand_augment_config(config_str, message):
    with pytest.raises(ValueError, match=message):
        aa.rand_augment_from_string(config_str)


@pytest.mark.parametrize(('config_str', 'message'), [
    ('bogus', "unknown AutoAugment policy 'bogus'"),
    ('3a', "unknown AutoAugment policy '3a'"),
    ('original-m5', "unknown section 'm5'"),
])
def test_bad_auto_augment_config(config_str, message):
    with pytest.raises(ValueError, match=message):
        aa.auto_augment_from_string(config_str)


