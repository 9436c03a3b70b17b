"""torch_checkpoint.py, what both converters read PyTorch files with: a refused pickle says how to read it anyway
where the converter offers -trust_pickle, through the library call as through the command line."""
import pytest
import torch

import load_pytorch_weights
from errors import EXIT_BAD_INPUT
from helpers import TINY_CONFIG
from torch_checkpoint import RefusedPickleError, read_checkpoint


@pytest.fixture
def pickled_module(tmp_path):
    path = tmp_path / 'model.pth'
    torch.save(torch.nn.Linear(2, 3), path)
    return path


def test_a_refused_pickle_names_trust_pickle(pickled_module, tmp_path, capsys):
    expected = (f'{pickled_module}: not a readable PyTorch checkpoint: it pickles torch.nn.modules.linear.Linear, '
                'which is not unpickled here (if you trust the file, add -trust_pickle)')
    with pytest.raises(RefusedPickleError) as refused:
        read_checkpoint(str(pickled_module))
    assert str(refused.value) == expected
    dst = tmp_path / 'out.pdparams'
    code = load_pytorch_weights.main(['-cfg', TINY_CONFIG, '-src', str(pickled_module), '-dst', str(dst)])
    assert code == EXIT_BAD_INPUT and not dst.exists()
    assert capsys.readouterr().err == f'error: {expected}\n'  # the hint once
    assert read_checkpoint(str(pickled_module), trust_pickle=True)['weight'].shape == (3, 2)


def test_a_module_refused_by_the_class_allow_list_offers_no_flag(pickled_module):
    """load_dalle_weights.py reads OpenAI's pickled modules by an allow-list of classes and has no -trust_pickle."""
    with pytest.raises(RefusedPickleError) as refused:
        read_checkpoint(str(pickled_module), module_classes=('dall_e.encoder.Encoder',))
    assert str(refused.value).endswith('it pickles torch.nn.modules.linear.Linear, which is not unpickled here')
