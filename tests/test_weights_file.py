"""weights_file.py: a frozen model's .pdparams read without running code and checked against the model, each
failure the caller's error naming the file."""
import paddle
import pytest

import weights_file
from errors import BadInputError


class StandInError(BadInputError):
    """The caller's kind of error."""


def read(path):
    return weights_file.read_state_dict(str(path), trust_pickle=False, error=StandInError, what='stand-in weights',
                                        converter_hint='make one with convert.py')


def test_a_state_dict_is_read_as_saved(tmp_path):
    layer = paddle.nn.Linear(3, 2)
    paddle.save(layer.state_dict(), str(tmp_path / 'w.pdparams'))
    state_dict = read(tmp_path / 'w.pdparams')
    assert sorted(state_dict) == ['bias', 'weight']
    assert (state_dict['weight'].numpy() == layer.weight.numpy()).all()


@pytest.mark.parametrize('make, message', [
    (lambda path: None, r'stand-in weights not found: {path} \(make one with convert.py\)'),
    (lambda path: path.write_bytes(b'not a pickle'), r'{path}: not a readable .pdparams file'),
    (lambda path: paddle.save([1, 2], str(path)), r'{path}: holds a list, not a state dict'),
])
def test_unreadable_files_raise_the_callers_error_naming_them(tmp_path, make, message):
    path = tmp_path / 'w.pdparams'
    make(path)
    with pytest.raises(StandInError, match=message.format(path=path)):
        read(path)


def test_a_state_dict_that_does_not_fit_is_named_by_its_first_difference():
    model = paddle.nn.Linear(3, 2)
    fits = dict(model.state_dict())
    weights_file.check_fits(fits, model, 'w.pdparams', error=StandInError, what='a stand-in')
    with pytest.raises(StandInError, match=r"w.pdparams: not the tensors of a stand-in: 1 missing \['bias'\], 0 "):
        weights_file.check_fits({'weight': fits['weight']}, model, 'w.pdparams', error=StandInError, what='a stand-in')
    with pytest.raises(StandInError, match=r'w.pdparams: bias has shape \[5\], a stand-in needs \[2\]'):
        weights_file.check_fits({**fits, 'bias': paddle.zeros([5])}, model, 'w.pdparams', error=StandInError,
                                what='a stand-in')


def test_frozen_models_evaluate_and_take_no_gradients():
    model = weights_file.frozen(paddle.nn.Sequential(paddle.nn.Linear(3, 2), paddle.nn.Dropout(0.5)))
    assert not model.training and all(param.stop_gradient for param in model.parameters())
