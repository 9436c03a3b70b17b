"""transforms.py against timm 1.0.31: eval pipeline, every augment op, RandAugment / AutoAugment draws and
statistics, config grammar, the train pipeline and image modes."""
import math
import pickle
import random

import numpy as np
import pytest
import timm
import torch
from conftest import ROOT
from PIL import Image
from scipy import stats
from timm.data import auto_augment as timm_aa
from timm.data import create_transform, resolve_data_config

import transforms as tr
from config import get_config

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR
TIMM_DEFAULT_MEAN = (0.485, 0.456, 0.406)


def _max_diff(ours: np.ndarray, theirs: torch.Tensor) -> float:
    assert ours.dtype == np.float32 and ours.shape == tuple(theirs.shape)
    return float(np.abs(ours - theirs.numpy()).max())


@pytest.fixture(scope='module')
def photos(photo_paths):
    return [Image.open(path).convert('RGB') for path in photo_paths]


@pytest.fixture(scope='module')
def small_photos(photos):
    """The real photos at most 96 px wide, so that thousands of op calls stay fast."""
    small = []
    for photo in photos:
        copy = photo.copy()
        copy.thumbnail((96, 96), BICUBIC)
        small.append(copy)
    return small


def _mode_variants(photo: Image.Image, folder, stem: str) -> list:
    """The photo saved as grayscale PNG, RGBA PNG (alpha varying across it) and CMYK JPEG, reopened."""
    rgba = photo.copy()
    rgba.putalpha(Image.linear_gradient('L').resize(photo.size))
    variants = [(photo.convert('L'), 'png'), (rgba, 'png'), (photo.convert('CMYK'), 'jpg')]
    paths = []
    for index, (image, ext) in enumerate(variants):
        path = folder / f'{stem}_{index}.{ext}'
        image.save(path, quality=95) if ext == 'jpg' else image.save(path)
        paths.append(path)
    return [Image.open(path) for path in paths]


# ---------------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize(('config_file', 'model_name'), [('beit_base_patch16_224.yaml', 'beit_base_patch16_224'),
                                                         ('beit_base_patch16_384.yaml', 'beit_base_patch16_384')])
def test_eval_transform_equals_timm(config_file, model_name, photos, tmp_path):
    config = get_config(str(ROOT / 'configs' / config_file))
    model_cfg = resolve_data_config({}, model=timm.create_model(model_name, pretrained=False))
    assert (model_cfg['crop_pct'], model_cfg['interpolation']) == (config.DATA.CROP_PCT, config.DATA.INTERPOLATION)
    assert model_cfg['mean'] == tuple(config.DATA.IMAGENET_MEAN) and model_cfg['std'] == tuple(config.DATA.IMAGENET_STD)
    theirs = create_transform(**model_cfg, is_training=False)
    ours = tr.get_val_transforms(config)
    size = config.DATA.IMAGE_SIZE
    checked = 0
    for index, photo in enumerate(photos):
        for image in [photo, *_mode_variants(photo, tmp_path, f'photo{index}')]:
            expected = theirs(image.convert('RGB'))  # timm's loader converts every image to RGB first
            result = ours(image)
            assert result.shape == (3, size, size)
            assert _max_diff(result, expected) <= 1e-6, (index, image.mode)
            checked += 1
    assert checked == 4 * len(photos)


def test_timm_eval_resize_is_pil_bicubic(photos):
    """torchvision resizes PIL images with PIL itself, so a pure-PIL reference equals timm's eval transform."""
    theirs = create_transform(224, crop_pct=0.9, interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3)
    for photo in photos:
        width, height = photo.size
        short, long = sorted((width, height))
        scaled = (248, int(248 * long / short))
        resized = photo.resize(scaled if width <= height else scaled[::-1], BICUBIC)
        left, top = round((resized.width - 224) / 2), round((resized.height - 224) / 2)
        crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32).transpose(2, 0, 1)
        assert _max_diff((crop / 255 - 0.5) / 0.5, theirs(photo)) <= 1e-6


def test_val_transform_rejects_zero_crop_pct():
    config = get_config()
    config.DATA.CROP_PCT = 0.0
    with pytest.raises(ValueError, match=r'DATA\.CROP_PCT'):
        tr.get_val_transforms(config)


# ---------------------------------------------------------------------------------------------------- modes


def test_to_rgb_handles_every_mode(small_photos):
    photo = small_photos[0]
    for mode in ('L', 'P', 'CMYK', 'RGBA', 'LA', 'PA', '1', 'I', 'F', 'YCbCr', 'HSV'):
        converted = tr.to_rgb(photo.convert(mode))
        assert (converted.mode, converted.size) == ('RGB', photo.size), mode
    rgba = photo.copy()
    rgba.putalpha(Image.linear_gradient('L').resize(photo.size))
    assert np.array_equal(np.asarray(tr.to_rgb(rgba)), np.asarray(photo)), 'RGBA keeps the colour, drops alpha'


@pytest.mark.parametrize('mode', ['I;16', 'I;16B'])
def test_sixteen_bit_grey_is_scaled_not_clipped(mode):
    values = np.array([[0, 128, 129, 257], [32767, 32768, 65278, 65535]], dtype=np.uint16)
    dtype = '>u2' if mode.endswith('B') else '<u2'
    image = Image.frombytes(mode, (4, 2), values.astype(dtype).tobytes())
    assert image.mode == mode
    rgb = np.asarray(tr.to_rgb(image))
    expected = np.round(values / 257).astype(np.uint8)
    assert np.array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


def test_to_rgb_rejects_non_images():
    with pytest.raises(TypeError, match='expected a PIL image, got ndarray'):
        tr.to_rgb(np.zeros((4, 4, 3), np.uint8))


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
        assert not np.asarray(tr.AugmentOp(name, prob=1.0, magnitude=magnitude)(photo)).any()


def test_op_set_is_what_timm_rand_and_auto_augment_use():
    assert set(tr.OP_NAMES) == _timm_op_names()
    assert tuple(timm_aa._RAND_TRANSFORMS) == tr.RAND_OPS
    assert tuple(timm_aa._RAND_INCREASING_TRANSFORMS) == tr.RAND_OPS_INCREASING


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
            ours = tr.AugmentOp(name, prob=1.0, magnitude=magnitude, magnitude_max=magnitude_max, fill=fill,
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
        tr.AugmentOp('Cutout')


# ---------------------------------------------------------------------------------------------------- policies


def _op_settings(op, timm_op=False) -> tuple:
    if timm_op:
        return op.name, op.prob, op.magnitude, op.magnitude_std, op.magnitude_max or 10
    return op.name, op.prob, op.magnitude, op.magnitude_std, op.magnitude_max


RAND_CONFIGS = ['rand-m9-mstd0.5-inc1', 'rand-m9-mstd0.5', 'rand', 'rand-n3-m7-p0.7-inc1', 'rand-m12-mmax15-mstd2',
                'rand-m6-mstd101-inc0', 'rand-inc1-m5-n1-p1.0']


@pytest.mark.parametrize('config_str', RAND_CONFIGS)
def test_rand_augment_grammar_equals_timm(config_str):
    theirs = timm_aa.rand_augment_transform(config_str, {'img_mean': (128,) * 3})
    ours = tr.rand_augment_from_string(config_str)
    assert ours.num_layers == theirs.num_layers
    assert [_op_settings(op) for op in ours.ops] == [_op_settings(op, timm_op=True) for op in theirs.ops]


@pytest.mark.parametrize('config_str', ['original', 'originalr', 'v0', 'v0r', 'original-mstd0.5'])
def test_auto_augment_policy_equals_timm(config_str):
    theirs = timm_aa.auto_augment_transform(config_str, {'img_mean': (128,) * 3})
    ours = tr.auto_augment_from_string(config_str)
    assert [[_op_settings(op) for op in sub] for sub in ours.policy] == \
           [[_op_settings(op, timm_op=True) for op in sub] for sub in theirs.policy]


def _seed_all(seed):
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
        ours = tr.rand_augment_from_string(config_str)
    else:
        theirs = timm_aa.auto_augment_transform(config_str, hparams)
        ours = tr.auto_augment_from_string(config_str)
    changed = 0
    for seed in range(30):
        for photo in small_photos[:3]:
            _seed_all(seed)
            expected = np.asarray(theirs(photo))
            _seed_all(seed)
            result = np.asarray(ours(photo))
            assert np.array_equal(result, expected), (config_str, seed)
            changed += not np.array_equal(result, np.asarray(photo))
    assert changed > 30


def _record_our_draws(monkeypatch, policy, draws: int) -> list:
    """Per image, the (op, magnitude or None if skipped) of every op the policy considered; no op runs."""
    records = []
    sample = tr.AugmentOp.sample_magnitude

    def recording_sample(op):
        magnitude = sample(op)
        records[-1].append((op, magnitude))
        return magnitude

    monkeypatch.setattr(tr.AugmentOp, 'sample_magnitude', recording_sample)
    monkeypatch.setattr(tr.AugmentOp, 'apply', lambda op, img, magnitude: img)
    pixel = Image.new('RGB', (1, 1))
    _seed_all(1234)
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
    _seed_all(1234)
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
    ours = tr.rand_augment_from_string('rand-m9-mstd0.5-inc1')
    records = _record_our_draws(monkeypatch, ours, draws)
    assert all(len(image) == 2 for image in records)
    applied = [(op.name, m) for image in records for op, m in image if m is not None]

    per_image = np.bincount([sum(m is not None for _, m in image) for image in records], minlength=3) / draws
    for count, p in enumerate((0.25, 0.5, 0.25)):
        assert _within(per_image[count], p, math.sqrt(p * (1 - p) / draws)), per_image
    chosen = np.array([tr.RAND_OPS_INCREASING.index(op.name) for image in records for op, _ in image])
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
    ours = tr.auto_augment_from_string('original-mstd0.5')
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
        tr.rand_augment_from_string(config_str)


@pytest.mark.parametrize(('config_str', 'message'), [
    ('bogus', "unknown AutoAugment policy 'bogus'"),
    ('3a', "unknown AutoAugment policy '3a'"),
    ('original-m5', "unknown section 'm5'"),
])
def test_bad_auto_augment_config(config_str, message):
    with pytest.raises(ValueError, match=message):
        tr.auto_augment_from_string(config_str)


# ---------------------------------------------------------------------------------------------------- train


def _small_config(**train):
    config = get_config()
    config.DATA.IMAGE_SIZE = 64
    for key, value in train.items():
        config.TRAIN[key] = value
    return config


def _find(pipeline, kind):
    return [step for step in pipeline.transforms if isinstance(step, kind)]


@pytest.mark.parametrize('mean', [(0.5, 0.5, 0.5), TIMM_DEFAULT_MEAN])
@pytest.mark.parametrize(('rand', 'auto', 'config_str'), [(True, False, 'rand-m9-mstd0.5-inc1'),
                                                          (False, True, 'original')])
def test_train_policy_gets_timm_hparams(mean, rand, auto, config_str):
    """Fill colour, resampling filter and settings equal what timm's ImageNet train transform builds. timm also
    passes translate_const, which only its absolute-translate ops read: neither op set has them, and the
    relative translate ops keep the default 0.45."""
    config = _small_config(RAND_AUGMENT=rand, AUTO_AUGMENT=auto)
    config.DATA.IMAGENET_MEAN = list(mean)
    if rand:
        config.TRAIN.RAND_AUGMENT_CONFIG = config_str
    else:
        config.TRAIN.AUTO_AUGMENT_POLICY = config_str
    timm_pipeline = create_transform(64, is_training=True, auto_augment=config_str, interpolation='bicubic',
                                     mean=mean, std=(0.5,) * 3)
    kind, timm_kind = (tr.RandAugment, timm_aa.RandAugment) if rand else (tr.AutoAugment, timm_aa.AutoAugment)
    [ours] = _find(tr.get_train_transforms(config), kind)
    [theirs] = _find(timm_pipeline, timm_kind)
    our_ops = ours.ops if rand else [op for sub in ours.policy for op in sub]
    their_ops = theirs.ops if rand else [op for sub in theirs.policy for op in sub]
    assert [(*_op_settings(op), op.fill, op.resample) for op in our_ops] == \
           [(*_op_settings(op, timm_op=True), op.kwargs['fillcolor'], op.kwargs['resample']) for op in their_ops]
    assert {op.name for op in their_ops}.isdisjoint({'TranslateX', 'TranslateY'})
    assert all('translate_pct' not in op.hparams for op in their_ops)


def test_train_colour_augmentation_choice():
    assert len(_find(tr.get_train_transforms(_small_config()), tr.RandAugment)) == 1
    auto = tr.get_train_transforms(_small_config(RAND_AUGMENT=False, AUTO_AUGMENT=True))
    assert len(_find(auto, tr.AutoAugment)) == 1 and not _find(auto, tr.RandAugment)
    [jitter] = _find(tr.get_train_transforms(_small_config(RAND_AUGMENT=False)), tr.T.ColorJitter)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.4, 0.4, 0.4, 0)
    plain = tr.get_train_transforms(_small_config(RAND_AUGMENT=False, COLOR_JITTER=0.0))
    assert not _find(plain, tr.T.ColorJitter)


def test_train_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^TRAIN\.RAND_AUGMENT_CONFIG: .*unknown section 'x3'"):
        tr.get_train_transforms(_small_config(RAND_AUGMENT_CONFIG='rand-m9-x3'))
    with pytest.raises(ValueError, match=r"^TRAIN\.AUTO_AUGMENT_POLICY: unknown AutoAugment policy 'bogus'"):
        tr.get_train_transforms(_small_config(RAND_AUGMENT=False, AUTO_AUGMENT=True, AUTO_AUGMENT_POLICY='bogus'))
    with pytest.raises(ValueError, match=r'TRAIN\.RAND_AUGMENT and TRAIN\.AUTO_AUGMENT are both on'):
        tr.get_train_transforms(_small_config(AUTO_AUGMENT=True))
    with pytest.raises(ValueError, match=r'^TRAIN\.RANDOM_ERASE_COUNT: .*min_count <= max_count'):
        tr.get_train_transforms(_small_config(RANDOM_ERASE_COUNT=0))


def test_train_transform_without_augmentation_is_deterministic(photos):
    """Augmentations off (crop = whole image, flip always, no colour ops, no erasing): equal to a pure-PIL
    reference and to timm's train transform with the same settings."""
    for photo in photos:
        ratio = photo.width / photo.height
        config = _small_config(RAND_AUGMENT=False, COLOR_JITTER=0.0, HFLIP_PROB=1.0, RANDOM_ERASE_PROB=0.0,
                               RRC_SCALE=[1.0, 1.0], RRC_RATIO=[ratio, ratio])
        config.DATA.IMAGE_SIZE = 224
        result = tr.get_train_transforms(config)(photo)
        flipped = photo.resize((224, 224), BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        reference = (np.asarray(flipped, dtype=np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
        assert result.dtype == np.float32 and np.abs(result - reference).max() <= 1e-6
        timm_pipeline = create_transform(224, is_training=True, scale=(1.0, 1.0), ratio=(ratio, ratio), hflip=1.0,
                                         color_jitter=None, interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3)
        assert _max_diff(result, timm_pipeline(photo)) <= 1e-6


@pytest.mark.parametrize('settings', [
    {},
    {'RAND_AUGMENT': False, 'AUTO_AUGMENT': True},
    {'RAND_AUGMENT': False, 'RANDOM_ERASE_PROB': 1.0, 'RANDOM_ERASE_MODE': 'rand', 'RANDOM_ERASE_COUNT': 3},
    {'RAND_AUGMENT_CONFIG': 'rand-m15-mmax20-n4-mstd101', 'RANDOM_ERASE_PROB': 1.0, 'RANDOM_ERASE_MODE': 'const'},
])
def test_train_transform_runs_on_all_modes(settings, small_photos):
    pipeline = tr.get_train_transforms(_small_config(**settings))
    photo = small_photos[1]
    sixteen = Image.frombytes('I;16', photo.size, (np.asarray(photo.convert('L'), np.uint16) * 257).tobytes())
    images = [photo.convert(mode) for mode in ('RGB', 'L', 'P', 'CMYK', 'RGBA', 'LA', '1')] + [sixteen]
    _seed_all(0)
    for image in images:
        for _ in range(5):
            result = pipeline(image)
            assert isinstance(result, np.ndarray) and result.dtype == np.float32, image.mode
            assert result.shape == (3, 64, 64) and result.flags.c_contiguous and np.isfinite(result).all()


def test_train_transform_survives_pickling(small_photos):
    """DataLoader workers started by spawn receive the pipeline pickled."""
    pipeline = pickle.loads(pickle.dumps(tr.get_train_transforms(_small_config(RANDOM_ERASE_PROB=1.0))))
    assert pipeline(small_photos[0]).shape == (3, 64, 64)
