"""errors.py: every error the user can fix derives from BadInputError, so the one catch in cli.py (and each script's
catch) turns it into EXIT_BAD_INPUT; a training failure does not."""
import ast
import importlib
import pickle

import pytest

import errors
from helpers import ROOT

INPUT_ERRORS = [('config', 'ConfigError'), ('sample_sources', 'DatasetError'), ('checkpoint', 'CheckpointError'),
                ('beit', 'CheckpointMismatchError'), ('inference', 'WeightsError'),
                ('run_folder', 'RunFolderBusyError'), ('dalle_tokenizer', 'TokenizerWeightsError'),
                ('torch_checkpoint', 'ConversionError'), ('torch_checkpoint', 'RefusedPickleError'),
                ('predict', 'ClassNamesError'), ('make_demo_data', 'SourceError'), ('plot_metrics', 'MetricsError'),
                ('safe_pickle', 'UnsafePickleError')]
RUN_FAILURES = {'NonFiniteLossError'}  # a diverged training: EXIT_TRAINING_FAILED, not the user's input


@pytest.mark.parametrize('module, name', INPUT_ERRORS)
def test_each_input_error_is_a_bad_input_error(module, name):
    assert issubclass(getattr(importlib.import_module(module), name), errors.BadInputError)


def test_no_error_class_is_left_outside_the_base():
    """A new error class in any module must derive from BadInputError, or be named here as a run failure."""
    classes = {}  # name -> the names of its bases, over every top-level module
    for path in ROOT.glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = [ast.unparse(base).rsplit('.', 1)[-1] for base in node.bases]

    def is_bad_input(name):
        return name == 'BadInputError' or any(is_bad_input(base) for base in classes.get(name, ()))

    error_classes = {name for name, bases in classes.items()
                     if name != 'BadInputError' and any(base.endswith(('Error', 'Exception')) for base in bases)}
    assert {name for _, name in INPUT_ERRORS} <= error_classes
    assert sorted(name for name in error_classes - RUN_FAILURES if not is_bad_input(name)) == []
    assert not any(is_bad_input(name) for name in RUN_FAILURES)


def test_a_refused_pickle_is_still_an_unpickling_error():
    import safe_pickle
    assert issubclass(safe_pickle.UnsafePickleError, pickle.UnpicklingError)


def test_exit_codes():
    assert (errors.EXIT_BAD_INPUT, errors.EXIT_TRAINING_FAILED) == (2, 1)
