"""The fine-tuning task's objective: top-k counts and the training and evaluation counts of a batch."""
import numpy as np
import paddle
import pytest

from beit import build_beit
from config import get_config
from engine import Amp, World
from helpers import TINY_CONFIG
from mixup import Mixup
from task_finetune import ClassificationObjective, build_classification_objective, topk_correct


def test_topk_correct_counts_rows_with_the_label_among_the_k_best():
    logits = paddle.to_tensor([[0.0, 5, 4, 3, 2, 1, -1], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7]])
    labels = paddle.to_tensor([1, 5, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels).numpy(), [1, 1])


def _batch(rng, size=4, num_classes=10):
    return (paddle.to_tensor(rng.standard_normal((size, 3, 32, 32)).astype('float32')),
            paddle.to_tensor(rng.integers(0, num_classes, size)))


def test_loader_drawn_mixup_trains_on_what_drawing_in_the_step_gave():
    """Batches carrying the draws of objective.batch_draws give the loss and counts of Mixup drawn in the step
    from the same generator (the old way), batch after batch."""
    config = get_config(TINY_CONFIG)
    paddle.seed(0)
    model = build_beit(config).eval()  # no drop path: both ways see the same logits for the same images
    objective = build_classification_objective(config, World())
    in_step = Mixup(config.MODEL.NUM_CLASSES, rng=np.random.default_rng(config.SEED), label_smoothing=0.1)
    rng = np.random.default_rng(2)
    for _ in range(3):
        images, labels = _batch(rng)
        draws = [paddle.to_tensor(part) for part in objective.batch_draws(4)]
        loss, counts = objective(model, (images, labels, *draws), Amp())
        mixed, targets = in_step(images, labels)
        expected = objective.criterion(model(mixed), targets)
        assert loss.item() == expected.item()
        assert counts.numpy()[3] == 4
    assert objective.mixup.rng.bit_generator.state == in_step.rng.bit_generator.state


def test_mixup_batches_without_draws_or_of_another_size_are_refused():
    config = get_config(TINY_CONFIG)
    objective = build_classification_objective(config, World())
    with pytest.raises(ValueError, match='a Mixup/CutMix training batch must carry its draws'):
        objective(build_beit(config), _batch(np.random.default_rng(0)), Amp())
    images, labels = _batch(np.random.default_rng(0))
    draws = [paddle.to_tensor(part) for part in objective.batch_draws(4)]
    with pytest.raises(ValueError, match=r'Mixup draws are for 32x32 images \(DATA.IMAGE_SIZE\), the batch has 16x16'):
        objective(build_beit(config), (images[:, :, :16, :16], labels, *draws), Amp())
    with pytest.raises(ValueError, match='Mixup needs the image_size of the training batches'):
        ClassificationObjective(objective.criterion, objective.mixup)
    config.TRAIN.MIXUP_ALPHA = config.TRAIN.CUTMIX_ALPHA = 0.0
    assert build_classification_objective(config, World()).batch_draws is None


def test_reseed_repeats_the_mixup_draws_of_a_seed_and_changes_them_with_it():
    """The loader's Mixup/CutMix draws after reseed depend on the seed alone: repeated for the same epoch seed,
    different for another (job._start_epoch derives one per SEED, epoch and rank)."""
    objective = build_classification_objective(get_config(TINY_CONFIG), World())

    def draws(seed):
        objective.reseed(seed)
        return np.concatenate([np.ravel(part).astype(np.float64) for _ in range(3)
                               for part in objective.batch_draws(4)])

    first = draws(11)
    np.testing.assert_array_equal(draws(11), first)
    for other in (12, 13):
        assert not np.array_equal(draws(other), first)
