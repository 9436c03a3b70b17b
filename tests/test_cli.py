"""The command line: single-dash flags and -opts over a config file, validated and frozen, errors naming the key."""
import re
import subprocess
import sys
from dataclasses import replace

import pytest

import cli
from beit import build_beit
from cli import build_arg_parser, update_config
from config import ConfigError, get_config
from errors import EXIT_BAD_INPUT
from helpers import ROOT, TINY_CONFIG
from task_finetune import FINE_TUNING


def parse(*argv):
    return build_arg_parser().parse_args(list(argv))


def test_flags_and_opts_override_the_file():
    args = parse('-cfg', str(ROOT / 'configs/beit_base_patch16_224.yaml'), '-dataset', 'imagenet2012',
                 '-data_path', '/data/in1k', '-batch_size', '16', '-batch_size_eval', '32', '-image_size', '384',
                 '-pretrained', 'w.pdparams', '-resume', 'ckpt.pdparams', '-last_epoch', '3', '-eval', '-amp',
                 '-output', '/tmp/run', '-accum_iter', '4',
                 '-opts', 'TRAIN.BASE_LR', '1e-3', 'MODEL.DROPPATH', '0', 'MODEL.INIT_VALUES', 'null',
                 'TRAIN.OPTIMIZER.BETAS', '[0.9, 0.98]', 'DATA.DATA_PATH', '12345')
    config = update_config(get_config(), args)
    assert config.DATA.DATA_PATH == '12345'  # -opts come last; a path stays a string
    assert (config.DATA.BATCH_SIZE, config.DATA.BATCH_SIZE_EVAL, config.DATA.IMAGE_SIZE) == (16, 32, 384)
    assert (config.MODEL.PRETRAINED, config.MODEL.RESUME, config.TRAIN.LAST_EPOCH) == ('w.pdparams', 'ckpt.pdparams', 3)
    assert config.EVAL and config.AMP and config.SAVE == '/tmp/run' and config.TRAIN.ACCUM_ITER == 4
    assert config.TRAIN.BASE_LR == 1e-3 and config.MODEL.DROPPATH == 0.0 and config.MODEL.INIT_VALUES is None
    assert config.TRAIN.OPTIMIZER.BETAS == [0.9, 0.98]
    assert config.is_frozen()
    assert build_beit(config).blocks[0].gamma_1 is None


def test_eval_batch_size_follows_batch_size_under_eval():
    assert update_config(get_config(), parse('-eval', '-batch_size', '256')).DATA.BATCH_SIZE_EVAL == 256
    assert update_config(get_config(), parse('-batch_size', '256')).DATA.BATCH_SIZE_EVAL == 64
    assert update_config(get_config(), parse('-eval', '-batch_size', '256', '-batch_size_eval', '8')
                         ).DATA.BATCH_SIZE_EVAL == 8


def test_defaults_are_usable_without_a_file():
    config = update_config(get_config(), parse())
    assert config.DATA.BATCH_SIZE_EVAL == 64 and config.MODEL.NAME == 'beit_base_patch16_224'


@pytest.mark.parametrize('opts, message', [
    (['TRAIN.BASE_LR'], 'KEY VALUE pairs'),
    (['TRAIN.BASE_RL', '1'], '-opts: unknown config key TRAIN.BASE_RL'),
    (['TRAIN.BASE_LR', 'fast'], "-opts: TRAIN.BASE_LR expects a float like 2e-05, got 'fast'"),
    (['TRAIN', '1'], 'TRAIN is a group of keys'),
    (['MODEL.INIT_VALUES', '-0.1'], 'MODEL.INIT_VALUES must be positive (layer scale init), or 0 or null'),
])
def test_bad_opts_name_the_key(opts, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        update_config(get_config(), parse('-opts', *opts))


def test_opts_given_twice_both_apply():
    """run_*_multi.sh pass -opts of their own before the user's."""
    config = update_config(get_config(), parse('-opts', 'TRAIN.BASE_LR', '1', 'SEED', '3', '-eval',
                                               '-opts', 'TRAIN.BASE_LR', '2'))
    assert (config.TRAIN.BASE_LR, config.SEED, config.EVAL) == (2.0, 3, True)


def test_missing_config_file():
    with pytest.raises(ConfigError, match='config file not found: .*nope.yaml'):
        update_config(get_config(), parse('-cfg', 'nope.yaml'))


def test_bad_flag_value_names_the_key():
    with pytest.raises(ConfigError, match='DATA.BATCH_SIZE_EVAL must be positive, got 0'):
        update_config(get_config(), parse('-batch_size_eval', '0'))


PROBE_LIKE = replace(FINE_TUNING, name='probing', own_keys=(('TRAIN.NUM_EPOCHS', 'LINPROBE.NUM_EPOCHS'),
                                                          ('DATA.BATCH_SIZE', 'LINPROBE.BATCH_SIZE')))


def test_a_tasks_own_keys_replace_the_shared_ones():
    """The file's recipe (TRAIN.NUM_EPOCHS 10, DATA.BATCH_SIZE 32) gives way; a flag sets the task's key."""
    config = update_config(get_config(), parse('-cfg', TINY_CONFIG, '-opts', 'LINPROBE.NUM_EPOCHS', '7'), PROBE_LIKE)
    assert (config.TRAIN.NUM_EPOCHS, config.DATA.BATCH_SIZE) == (7, 128)
    config = update_config(get_config(), parse('-cfg', TINY_CONFIG, '-batch_size', '16'), PROBE_LIKE)
    assert config.DATA.BATCH_SIZE == config.LINPROBE.BATCH_SIZE == 16
    assert update_config(get_config(), parse('-cfg', TINY_CONFIG)).TRAIN.NUM_EPOCHS == 10  # other tasks: the file's


def test_opts_naming_a_replaced_key_are_refused():
    with pytest.raises(ConfigError, match=re.escape('-opts: probing takes TRAIN.NUM_EPOCHS from LINPROBE.NUM_EPOCHS: '
                                                    'set LINPROBE.NUM_EPOCHS instead')):
        update_config(get_config(), parse('-opts', 'TRAIN.NUM_EPOCHS', '3'), PROBE_LIKE)


def test_ngpus_0_is_refused_with_exit_2(capsys):
    assert cli.launch(['-cfg', TINY_CONFIG, '-ngpus', '0'], task=FINE_TUNING, description='test') == EXIT_BAD_INPUT
    assert 'error: -ngpus: NGPUS must be a process count of at least 1' in capsys.readouterr().err


@pytest.mark.parametrize('output, expected', [(None, 'run'), ('elsewhere', 'elsewhere')])
def test_resume_continues_in_its_folder_unless_output_says_otherwise(output, expected, tmp_path):
    (tmp_path / 'run').mkdir()
    for resume in (tmp_path / 'run', tmp_path / 'run' / 'checkpoint-epoch-3.pdparams'):
        flags = ['-resume', str(resume)] + (['-output', str(tmp_path / output)] if output else [])
        config = update_config(get_config(), build_arg_parser().parse_args(flags))
        assert str(tmp_path / expected) == config.SAVE


@pytest.mark.slow
def test_a_script_given_an_unusable_file_value_exits_2_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text(f'BASE: {TINY_CONFIG}\nTRAIN:\n  SMOOTHING: 1.5\n')
    result = subprocess.run([sys.executable, str(ROOT / 'main_single_gpu.py'), '-cfg', str(path),
                             '-output', str(tmp_path / 'out')], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert result.stderr.endswith(f'error: {path}: TRAIN.SMOOTHING must lie in [0, 1], got 1.5\n'), result.stderr
    assert not (tmp_path / 'out').exists()
