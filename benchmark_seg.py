"""benchmark.py's segmentation rows (``-task segmentation``): BeitUperNet next to transformers'
BeitForSemanticSegmentation of the same shape, on the same batch (crop-sized images and labels) and threads.

- eval: one forward of the crop model in eval mode, the main logits at 1/4 of the crop (what seg_inference calls
  per window). transformers' forward also runs its auxiliary head in eval mode (its model does; ours skips it).
- train: both heads, the task's loss (task_segment.SegmentationObjective.loss: main + SEG.AUX_LOSS_WEIGHT x
  auxiliary, each resized to the labels, mmseg's mean over all pixels), backward, an AdamW step. transformers
  computes its own loss (``labels=``: main + auxiliary_loss_weight x auxiliary, the same weight, resized the same
  way, torch's mean over the non-ignored pixels); the labels hold no ignored pixel, so both losses are the same
  function.
- train needs 2 images or more: the pyramid pooling's 1x1 map has one value per channel and image, which torch's
  BatchNorm refuses to normalise in training (Paddle's accepts it).
- Both run without drop path and without the heads' dropout (transformers' heads have none): the same work.
- Paths: dygraph (as a run builds the model: cpu_ops' kernels on the CPU), static (paddle.jit.to_static of the
  whole segmentor, both modes), transformers (fp32, torch.optim.AdamW). No Paddle Inference or AMP rows: the
  classification rows measure those paths of the same encoder.
"""
import os

import numpy as np

SEG_BACKENDS = ('dygraph', 'static', 'transformers')
REFERENCE = 'transformers'
MIN_TRAIN_BATCH = 2
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.05  # as the classification rows step


def is_segmentation_config(config) -> bool:
    """Whether the config's files set SEG keys: a segmentation config, not a classification one (-opts alone do not
    make one)."""
    from config import origin
    return any(origin(config, f'SEG.{key}') not in (None, '-opts') for key in config.SEG)


def same_work(config) -> None:
    """The settings both models share in every timed step: no drop path, no dropout before the classifiers."""
    config.MODEL.DROPPATH = 0.0
    config.SEG.DROPOUT = 0.0


def seg_batch(config, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [B, 3, S, S] float32, labels [B, S, S] int64 in [0, SEG.NUM_CLASSES), none ignored)."""
    size, rng = config.DATA.IMAGE_SIZE, np.random.default_rng(0)
    images = rng.standard_normal((batch_size, config.DATA.IMAGE_CHANNELS, size, size)).astype(np.float32)
    return images, rng.integers(0, config.SEG.NUM_CLASSES, (batch_size, size, size), dtype=np.int64)


def paddle_seg_step(config, backend: str, mode: str, batch_size: int, *, processes: int = 1):
    """A function running one eval forward or one train step of BeitUperNet on ``backend`` (dygraph, static)."""
    import paddle

    from run_setup import build_model
    from task_segment import SEGMENTATION, SegmentationObjective
    from utils import use_all_cpu_cores
    use_all_cpu_cores(processes)
    images, labels = seg_batch(config, batch_size)
    model = build_model(config, SEGMENTATION)  # as a run builds it
    if backend == 'static':
        size = config.DATA.IMAGE_SIZE
        spec = paddle.static.InputSpec([None, config.DATA.IMAGE_CHANNELS, size, size], 'float32')
        model = paddle.jit.to_static(model, input_spec=[spec], full_graph=True)
    inputs = paddle.to_tensor(images)
    if mode == 'eval':
        model.eval()

        def eval_step():
            with paddle.no_grad():
                model(inputs).numpy()
        return eval_step
    seg = config.SEG
    objective = SegmentationObjective(num_classes=seg.NUM_CLASSES, ignore_index=seg.IGNORE_INDEX,
                                      aux_weight=seg.AUX_LOSS_WEIGHT, settings=None)  # the loss needs no inference
    targets = paddle.to_tensor(labels)
    optimizer = paddle.optimizer.AdamW(LEARNING_RATE, parameters=model.parameters(), weight_decay=WEIGHT_DECAY)
    model.train()

    def train_step():
        main, aux = model(inputs)
        loss, _ = objective.loss(main, aux, targets)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        loss.item()
    return train_step


def transformers_seg_step(config, backend: str, mode: str, batch_size: int, *, processes: int = 1,
                          place: str = 'cpu'):
    """The same for transformers' BeitForSemanticSegmentation (its own random init) on torch device ``place``."""
    import torch

    from seg_checkpoints import random_transformers_model
    torch.set_num_threads(os.cpu_count() or 1)
    images, labels = seg_batch(config, batch_size)
    reference = random_transformers_model(config).to(place)
    inputs = torch.from_numpy(images).to(place)
    if mode == 'eval':
        reference.eval()

        def eval_step():
            with torch.no_grad():
                reference(pixel_values=inputs).logits.cpu().numpy()
        return eval_step
    targets = torch.from_numpy(labels).to(place)
    optimizer = torch.optim.AdamW(reference.parameters(), LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    reference.train()

    def train_step():
        loss = reference(pixel_values=inputs, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
    return train_step
