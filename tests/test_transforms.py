"""transforms.py against timm 1.0.31: the eval pipeline, the train pipeline and image modes. Our pipelines give
uint8 images (normalised on the device after the loader); they are compared with timm's after normalisation."""
import pickle

import numpy as np
import paddle
import pytest
import timm
import torch
from dall_e import utils as dall_e_utils
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import create_transform, resolve_data_config

import auto_augment as aa
import device_batch
import transforms as tr
from config import get_config
from helpers import ROOT
from test_auto_augment import op_settings, seed_all

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR
TIMM_DEFAULT_MEAN = (0.485, 0.456, 0.406)


def _max_diff(ours: np.ndarray, theirs: torch.Tensor) -> float:
    assert ours.dtype == np.float32 and ours.shape == tuple(theirs.shape)
    return float(np.abs(ours - theirs.numpy()).max())


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


@pytest.mark.parametrize(('config_file', 'model_name'), [
    ('beit_base_patch16_224.yaml', 'beit_base_patch16_224'),
    ('beit_base_patch16_384.yaml', 'beit_base_patch16_384'),
    ('beitv2_base_patch16_224_pt1k_ft1k.yaml', 'beitv2_base_patch16_224.in1k_ft_in1k'),
    ('beitv2_base_patch16_224_pt1k_ft21kto1k.yaml', 'beitv2_base_patch16_224.in1k_ft_in22k_in1k'),
    ('beitv2_large_patch16_224_pt1k_ft1k.yaml', 'beitv2_large_patch16_224.in1k_ft_in1k'),
    ('beitv2_large_patch16_224_pt1k_ft21kto1k.yaml', 'beitv2_large_patch16_224.in1k_ft_in22k_in1k'),
])
def test_eval_transform_equals_timm(config_file, model_name, photos, tmp_path):
    """The config's eval transform is timm's for the weights it describes (on the meta device: no weights needed)."""
    config = get_config(str(ROOT / 'configs' / config_file))
    model_cfg = resolve_data_config({}, model=timm.create_model(model_name, pretrained=False, device='meta'))
    assert (model_cfg['crop_pct'], model_cfg['interpolation']) == (config.DATA.CROP_PCT, config.DATA.INTERPOLATION)
    assert model_cfg['mean'] == tuple(config.DATA.IMAGENET_MEAN) and model_cfg['std'] == tuple(config.DATA.IMAGENET_STD)
    theirs = create_transform(**model_cfg, is_training=False)
    ours, normalise = tr.get_val_transforms(config), tr.host_normalise(config)
    size = config.DATA.IMAGE_SIZE
    checked = 0
    for index, photo in enumerate(photos):
        for image in [photo, *_mode_variants(photo, tmp_path, f'photo{index}')]:
            expected = theirs(image.convert('RGB'))  # timm's loader converts every image to RGB first
            pixels = ours(image)
            assert pixels.shape == (3, size, size) and pixels.dtype == np.uint8
            assert _max_diff(normalise(pixels), expected) <= 1e-6, (index, image.mode)
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


def test_old_pillow_16_bit_mode_i_is_scaled_and_clipped():
    img = Image.fromarray(np.array([[-5, 257, 65535, 70000]], np.int32))
    assert img.mode == 'I'
    np.testing.assert_array_equal(np.asarray(tr.to_rgb(img))[..., 0], [[0, 1, 255, 255]])


def test_to_rgb_rejects_non_images():
    with pytest.raises(TypeError, match='expected a PIL image, got ndarray'):
        tr.to_rgb(np.zeros((4, 4, 3), np.uint8))



# ---------------------------------------------------------------------------------------------------- train


def _small_config(cfg_file=None, **train):
    config = get_config(cfg_file)
    config.DATA.IMAGE_SIZE = 64
    config.TRAIN.update(train)
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
    kind, timm_kind = (aa.RandAugment, timm_aa.RandAugment) if rand else (aa.AutoAugment, timm_aa.AutoAugment)
    [ours] = _find(tr.get_train_transforms(config), kind)
    [theirs] = _find(timm_pipeline, timm_kind)
    our_ops = ours.ops if rand else [op for sub in ours.policy for op in sub]
    their_ops = theirs.ops if rand else [op for sub in theirs.policy for op in sub]
    assert [(*op_settings(op), op.fill, op.resample) for op in our_ops] == \
           [(*op_settings(op, timm_op=True), op.kwargs['fillcolor'], op.kwargs['resample']) for op in their_ops]
    assert {op.name for op in their_ops}.isdisjoint({'TranslateX', 'TranslateY'})
    assert all('translate_pct' not in op.hparams for op in their_ops)


def test_train_colour_augmentation_choice():
    assert len(_find(tr.get_train_transforms(_small_config()), aa.RandAugment)) == 1
    auto = tr.get_train_transforms(_small_config(RAND_AUGMENT=False, AUTO_AUGMENT=True))
    assert len(_find(auto, aa.AutoAugment)) == 1 and not _find(auto, aa.RandAugment)
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
        tr.get_train_erasing(_small_config(RANDOM_ERASE_COUNT=0))


def test_train_erasing_follows_the_config():
    """The random erasing of the train pipeline (drawn in the worker, applied on the device): timm's settings for
    BEiT from the TRAIN.RANDOM_ERASE_* keys, none at probability 0."""
    erasing = tr.get_train_erasing(_small_config(RANDOM_ERASE_MODE='rand', RANDOM_ERASE_COUNT=3,
                                                 RANDOM_ERASE_SPLIT=True))
    assert (erasing.probability, erasing.mode, erasing.min_count, erasing.max_count, erasing.num_splits) == \
           (0.25, 'rand', 1, 3, 2)
    assert tr.get_train_erasing(_small_config(RANDOM_ERASE_PROB=0.0)) is None


@pytest.mark.parametrize('cfg_name', [None, 'beitv2_base_patch16_224_pt1k_ft1k.yaml'])
def test_train_transform_without_augmentation_is_deterministic(photos, cfg_name):
    """Augmentations off (crop = whole image, flip always, no colour ops, no erasing): equal to a pure-PIL
    reference and to timm's train transform with the same settings, normalised as the config says (BEiT v2:
    the ImageNet mean/std)."""
    for photo in photos:
        ratio = photo.width / photo.height
        config = _small_config(cfg_name and str(ROOT / 'configs' / cfg_name), RAND_AUGMENT=False, COLOR_JITTER=0.0,
                               HFLIP_PROB=1.0, RANDOM_ERASE_PROB=0.0, RRC_SCALE=[1.0, 1.0], RRC_RATIO=[ratio, ratio])
        config.DATA.IMAGE_SIZE = 224
        mean, std = tuple(config.DATA.IMAGENET_MEAN), tuple(config.DATA.IMAGENET_STD)
        pixels_out = tr.get_train_transforms(config)(photo)
        assert pixels_out.dtype == np.uint8
        result = tr.host_normalise(config)(pixels_out)
        flipped = photo.resize((224, 224), BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(flipped, dtype=np.float32).transpose(2, 0, 1) / 255
        reference = (pixels - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
        assert result.dtype == np.float32 and np.abs(result - reference).max() <= 1e-6
        timm_pipeline = create_transform(224, is_training=True, scale=(1.0, 1.0), ratio=(ratio, ratio), hflip=1.0,
                                         color_jitter=None, interpolation='bicubic', mean=mean, std=std)
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
    seed_all(0)
    for image in images:
        for _ in range(5):
            result = pipeline(image)
            assert isinstance(result, np.ndarray) and result.dtype == np.uint8, image.mode
            assert result.shape == (3, 64, 64) and result.flags.c_contiguous


def test_train_transform_survives_pickling(small_photos):
    """DataLoader workers started by spawn receive the pipeline pickled."""
    pipeline = pickle.loads(pickle.dumps(tr.get_train_transforms(_small_config(RANDOM_ERASE_PROB=1.0))))
    assert pipeline(small_photos[0]).shape == (3, 64, 64)


# ---------------------------------------------------------------------------------------------------- pre-training

LANCZOS = Image.Resampling.LANCZOS


def _pretrain_config(**train):
    config = _small_config(**{'RAND_AUGMENT': False, 'COLOR_JITTER': 0.0, **train})
    config.PRETRAIN.SECOND_INPUT_SIZE = 32
    return config


def _position_image(width=90, height=70) -> Image.Image:
    """Red rises with x, green with y: a view's pixels tell where in the image they came from."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8))


def test_two_view_crop_resizes_one_box_to_both_sizes(small_photos):
    crop = tr.TwoViewResizedCrop(64, 32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation='bicubic',
                                 second_interpolation='lanczos')
    for seed, photo in enumerate(small_photos):
        seed_all(seed)
        top, left, height, width = crop._dynamic_get_param(photo)  # the draw the crop will make
        seed_all(seed)
        patch_view, tokenizer_view = crop(photo)
        box = photo.crop((left, top, left + width, top + height))
        assert (patch_view.size, tokenizer_view.size) == ((64, 64), (32, 32))
        np.testing.assert_array_equal(np.asarray(patch_view), np.asarray(box.resize((64, 64), BICUBIC)))
        np.testing.assert_array_equal(np.asarray(tokenizer_view), np.asarray(box.resize((32, 32), LANCZOS)))


@pytest.mark.parametrize('flip', [0.0, 1.0])
def test_pretrain_views_show_the_same_flipped_region_in_their_ranges(flip):
    transform = tr.get_pretrain_transforms(_pretrain_config(HFLIP_PROB=flip))
    image = _position_image()
    for seed in range(5):
        seed_all(seed)
        patch_view, tokenizer_view = transform(image)
        assert patch_view.shape == (3, 64, 64) and tokenizer_view.shape == (3, 32, 32)
        assert patch_view.dtype == tokenizer_view.dtype == np.uint8
        pixels = patch_view / 255
        tokenizer_view = device_batch.tokenizer_input(paddle.to_tensor(tokenizer_view[None])).numpy()[0]
        assert tokenizer_view.dtype == np.float32
        tokenizer_pixels = (tokenizer_view - 0.1) / 0.8  # transforms.map_pixels: (1 - 2 * 0.1) x + 0.1
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
        assert tokenizer_view.min() >= 0.1 - 1e-6 and tokenizer_view.max() <= 0.9 + 1e-6
        np.testing.assert_allclose(pixels[2], 128 / 255, atol=1e-6)
        np.testing.assert_allclose(tokenizer_pixels[2], 128 / 255, atol=1e-6)
        # the same region: the 32 px view equals the 64 px view shrunk (up to the two filters' differences)
        shrunk = np.asarray(Image.fromarray(np.rint(pixels.transpose(1, 2, 0) * 255).astype(np.uint8))
                            .resize((32, 32), BICUBIC), dtype=np.float32).transpose(2, 0, 1) / 255
        assert np.abs(shrunk - tokenizer_pixels).max() < 0.03
        for view in (pixels, tokenizer_pixels):  # red runs against x when flipped, green always down y
            assert np.sign(view[0, :, -1] - view[0, :, 0]).mean() == (-1 if flip else 1)
            assert (view[1, -1, :] > view[1, 0, :]).all()


def test_pretrain_transform_uses_colour_jitter_and_survives_pickling(small_photos):
    config = _pretrain_config(COLOR_JITTER=0.4)
    pipeline = pickle.loads(pickle.dumps(tr.get_pretrain_transforms(config)))
    jitter = [step for step in pipeline.shared.transforms if isinstance(step, tr.T.ColorJitter)]
    assert len(jitter) == 1 and jitter[0].hue == 0
    patch_view, tokenizer_view = pipeline(small_photos[0].convert('L'))
    assert patch_view.shape == (3, 64, 64) and tokenizer_view.shape == (3, 32, 32)


def test_map_pixels_matches_the_dall_e_package_on_arrays_and_tensors():
    pixels = np.random.default_rng(0).random((2, 3, 5, 5), dtype=np.float32)
    expected = dall_e_utils.map_pixels(torch.from_numpy(pixels)).numpy()
    assert dall_e_utils.logit_laplace_eps == tr.LOGIT_LAPLACE_EPS
    mapped = tr.map_pixels(pixels)
    assert mapped.dtype == np.float32
    np.testing.assert_allclose(mapped, expected, rtol=1e-6)
    np.testing.assert_allclose(tr.map_pixels(paddle.to_tensor(pixels)).numpy(), expected, rtol=1e-6)


def test_linear_probe_pipeline_crops_and_flips_only(small_photos):
    """unilm's probe training: random resized crop and flip; no RandAugment and no erasing even when the config's
    fine-tuning recipe has them. A crop of the whole square image, never flipped, is the eval pipeline's image."""
    config = get_config(str(ROOT / 'configs' / 'beit_tiny_fashion_mnist.yaml'))
    assert config.TRAIN.RAND_AUGMENT and config.TRAIN.RANDOM_ERASE_PROB > 0
    config.DATA.IMAGE_SIZE, config.DATA.CROP_PCT = 32, 1.0
    config.TRAIN.RRC_SCALE, config.TRAIN.RRC_RATIO, config.TRAIN.HFLIP_PROB = [1.0, 1.0], [1.0, 1.0], 0.0
    config.TRAIN.RANDOM_ERASE_PROB = 1.0
    photo = small_photos[0].crop((0, 0, min(small_photos[0].size), min(small_photos[0].size)))
    probe, evaluation = tr.get_linear_probe_transforms(config), tr.get_val_transforms(config)
    for _ in range(3):
        np.testing.assert_array_equal(probe(photo), evaluation(photo))
    config.TRAIN.HFLIP_PROB = 1.0
    np.testing.assert_array_equal(tr.get_linear_probe_transforms(config)(photo), evaluation(photo)[:, :, ::-1])
