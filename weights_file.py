"""A frozen model's weights file (the tokenizers' .pdparams): read without running code, and checked to fit the model,
every failure an error of the caller's kind naming the file."""
import os

import paddle

import safe_pickle
from errors import BadInputError


def read_state_dict(path: str, *, trust_pickle: bool, error: type[BadInputError], what: str,
                    converter_hint: str) -> dict:
    """The state dict in the .pdparams ``path`` (a missing file named as ``what``, with ``converter_hint``, which
    says how to make one)."""
    if not os.path.isfile(path):
        raise error(f'{what} not found: {path} ({converter_hint})')
    try:
        state_dict = safe_pickle.load(path, trust_pickle=trust_pickle)
    except safe_pickle.UnsafePickleError as err:
        raise error(str(err)) from None
    except Exception as err:  # paddle raises many types for foreign or truncated files
        raise error(f'{path}: not a readable .pdparams file ({type(err).__name__}: '
                    f'{str(err).splitlines()[0] if str(err) else ""})') from err
    if not isinstance(state_dict, dict):
        raise error(f'{path}: holds a {type(state_dict).__name__}, not a state dict')
    return state_dict


def check_fits(state_dict: dict, model: paddle.nn.Layer, source: str, *, error: type[BadInputError],
               what: str) -> None:
    """Same tensor names and shapes as ``model`` (``what`` names it), or ``error`` naming the first difference."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    if missing or unexpected:
        raise error(f'{source}: not the tensors of {what}: {len(missing)} missing {missing[:3]}, '
                    f'{len(unexpected)} unexpected {unexpected[:3]}')
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise error(f'{source}: {name} has shape {list(state_dict[name].shape)}, {what} needs {list(shape)}')


def frozen(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """``model`` in eval mode with no parameter taking gradients: a tokenizer's targets, not trained."""
    for param in model.parameters():
        param.stop_gradient = True
    return model.eval()
