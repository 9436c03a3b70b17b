"""Training checkpoints (what they hold: save, load, check) and starting weights for -pretrained; where they live
in a run folder is run_folder.py's.

A checkpoint is one file, written atomically, holding everything a resumed run needs to continue as if it had
never stopped: model (float32, the master weights under AMP O2), optimizer, LR scheduler, grad scaler, EMA,
finished epochs, global step and the config. No RNG state: every epoch seeds every generator from (SEED,
epoch, rank), so a saved state would be overwritten before its first use (and a GPU's does not fit a CPU).
Files are read and checked completely before a run touches its output folder.
"""
import hashlib
import os

import numpy as np
import paddle

import safe_pickle
from beit import CheckpointMismatchError, adapt_state_dict
from errors import BadInputError
from optim import float32_weights
from utils import save_atomically

REQUIRED_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch', 'global_step')
_WRAPPER_KEYS = ('model', 'module', 'state_dict', 'model_ema')  # what holds a state dict in the files of each zoo


class CheckpointError(BadInputError):
    """A checkpoint file that is missing, unreadable, or not what the run needs."""


def save_checkpoint(path: str, *, model, optimizer, lr_scheduler, grad_scaler, model_ema, epoch: int,
                    global_step: int, config, best: dict | None = None, written: list[str] = (),
                    frozen_weights: dict | None = None, o2: bool = False) -> None:
    """``model`` is what a resumed run restores: the whole model, or the trained part of a partly frozen one, whose
    frozen weights ``frozen_weights`` ({pretrained, digest}) identifies; ``o2``: the run is AMP O2, whose
    float32 master weights the optimizer holds (optim.float32_weights)."""
    save_atomically({
        'model': float32_weights(model, optimizer, o2=o2),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'grad_scaler': grad_scaler.state_dict(),
        'model_ema': model_ema.state_dict() if model_ema is not None else None,
        'epoch': epoch,
        'global_step': global_step,
        'best': best,  # {<metric>, epoch, weights}: the best validation so far, which a resumed run carries on
        'written': [os.path.basename(name) for name in written],  # the run's epoch checkpoints, for retention
        'config': config.dump(),
        'frozen_weights': frozen_weights,
    }, path)


def weights_digest(model) -> str:
    """SHA-256 of ``model``'s state dict (names, dtypes, shapes and bytes): the same weights give the same digest on
    every device and process."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = np.ascontiguousarray(tensor.numpy())
        digest.update(f'{name} {values.dtype} {values.shape}\n'.encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def _read(path: str, what: str, *, return_numpy: bool = False, trust_pickle: bool = False):
    """The object in ``path``, read without running code (safe_pickle) unless ``trust_pickle``."""
    try:
        return safe_pickle.load(path, return_numpy=return_numpy, trust_pickle=trust_pickle)
    except safe_pickle.UnsafePickleError as err:
        raise CheckpointError(f'{what}: {err}') from None
    except Exception as err:  # pickle and paddle raise many types for truncated or foreign files
        raise CheckpointError(f'{what}: cannot read {path}: {str(err).splitlines()[0] if str(err) else err!r}') from err


def load_training_checkpoint(path: str, *, trust_pickle: bool = False) -> dict:
    """The checkpoint dict of a -resume file, refusing anything that is not a complete training checkpoint."""
    checkpoint = _read(path, '-resume', trust_pickle=trust_pickle)
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(f'-resume: {path} is not a training checkpoint (it needs {", ".join(REQUIRED_KEYS)}); '
                              'to start from weights only, use -pretrained')
    return checkpoint


def check_exact_fit(state_dict: dict, model, path: str) -> None:
    """A resumed model must be the same architecture: the same tensor names with the same shapes."""
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: list(tensor.shape) for name, tensor in state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = [f'{name} {found[name]} (model {expected[name]})' for name in expected
                if name in found and found[name] != expected[name]]
    if missing or unexpected or reshaped:
        details = [f'{label}: {", ".join(items[:4])}' for label, items in
                   (('missing', missing), ('unexpected', unexpected), ('other shape', reshaped)) if items]
        raise CheckpointMismatchError(f'-resume: {path} was saved for another architecture than the config '
                                      f'describes ({"; ".join(details)})')


def unwrap_state_dict(obj, source: str) -> dict:
    """The tensors of a training checkpoint or bare state dict, without a DataParallel ``module.`` prefix."""
    while isinstance(obj, dict):
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(obj.get(key), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
        found = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f'{source}: no state dict of tensors found (top level holds {found})')
    return {key[len('module.'):] if key.startswith('module.') else key: value for key, value in obj.items()}


def check_pretrained_path(path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f'-pretrained: file not found: {path}')


def pretrained_state_dict(path: str, use_ema: bool, *, trust_pickle: bool = False) -> tuple[dict, int | None]:
    """(name -> numpy array, epoch) from a converted .pdparams, a bare state dict (epoch None), or a training
    checkpoint's model (or its EMA with ``use_ema``)."""
    check_pretrained_path(path)
    obj = _read(path, '-pretrained', return_numpy=True, trust_pickle=trust_pickle)
    is_training_checkpoint = isinstance(obj, dict) and isinstance(obj.get('model'), dict)
    epoch = obj.get('epoch') if is_training_checkpoint else None
    if use_ema:
        if not is_training_checkpoint or not isinstance(obj.get('model_ema'), dict):
            raise CheckpointError(f'-pretrained: MODEL.PRETRAINED_EMA is set but {path} holds no EMA weights')
        obj = obj['model_ema']
    elif is_training_checkpoint:
        obj = obj['model']
    return unwrap_state_dict(obj, f'-pretrained: {path}'), epoch


def load_pretrained(model, path: str, use_ema: bool, rel_pos_interp: str, *, complete: bool = False,
                    trust_pickle: bool = False) -> tuple[list, int | None]:
    """Fit the weights of ``path`` to ``model`` (shared bias spread, tables resampled, and to start fine-tuning a
    head of another class count dropped: beit.adapt_state_dict, or the model's own ``fit_pretrained`` with the
    same arguments and result, as the segmentor's) and load them; returns adapt_state_dict's notes
    and the epoch of a training checkpoint. ``complete`` (evaluation): every model tensor must be in the file."""
    state_dict, epoch = pretrained_state_dict(path, use_ema, trust_pickle=trust_pickle)
    try:
        fit = getattr(model, 'fit_pretrained', None)  # a model other than a BEiT says how weights fit it
        fitted, notes = (fit(state_dict, rel_pos_interp, complete) if fit is not None
                         else adapt_state_dict(state_dict, model, rel_pos_interp, complete))
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f'-pretrained {path}: {err}') from None
    kept = model.state_dict()  # what the checkpoint does not provide (a dropped head) stays as initialised
    kept.update({name: paddle.to_tensor(value) for name, value in fitted.items()})
    model.set_state_dict(kept)
    return notes, epoch
