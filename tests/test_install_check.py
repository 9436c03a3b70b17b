"""install_check.py: which requirements the README's scripts install next to which installed Paddle (stand-in
Paddle modules: a version and whether it is a CUDA build)."""
import re
from types import SimpleNamespace

import pytest

import install_check


def stand_in_paddle(version: str, *, gpus: int | None = None):
    cuda = SimpleNamespace(device_count=lambda: gpus or 0)
    return SimpleNamespace(__version__=version, device=SimpleNamespace(is_compiled_with_cuda=lambda: gpus is not None,
                                                                       cuda=cuda))


@pytest.fixture()
def requirements(tmp_path):
    (tmp_path / 'runtime').mkdir()
    (tmp_path / 'runtime' / 'base.txt').write_text('# runtime\npaddlepaddle==3.3.1\nPaddlePaddle_GPU>=3  # any\n'
                                                   'numpy\n\n')
    (tmp_path / 'test.txt').write_text('-r runtime/base.txt\npytest\t# the runner\n--requirement=more.txt\n')
    (tmp_path / 'more.txt').write_text('torch==2.14.1\n')
    return str(tmp_path / 'test.txt')


def test_includes_are_read_in_place_without_comments(requirements):
    assert install_check.requirement_lines(requirements) == ['paddlepaddle==3.3.1', 'PaddlePaddle_GPU>=3', 'numpy',
                                                             'pytest', 'torch==2.14.1']


@pytest.mark.parametrize('paddle', [stand_in_paddle('3.3.1'), stand_in_paddle('3.0.0', gpus=2),
                                    stand_in_paddle('0.0.0', gpus=1)], ids=['cpu-3.3', 'gpu-3.0', 'gpu-develop'])
def test_an_installed_paddle_3_is_kept(monkeypatch, requirements, paddle):
    monkeypatch.setattr(install_check, 'installed_paddle', lambda: paddle)
    assert install_check.requirements_to_install([requirements]) == ['numpy', 'pytest', 'torch==2.14.1']


def test_without_paddle_or_with_a_cpu_paddle_2_the_requirement_is_installed(monkeypatch, requirements):
    for paddle in (None, stand_in_paddle('2.6.2')):
        monkeypatch.setattr(install_check, 'installed_paddle', lambda paddle=paddle: paddle)
        assert install_check.requirements_to_install([requirements])[0] == 'paddlepaddle==3.3.1'


def test_a_gpu_paddle_2_is_not_swapped_for_the_cpu_build(monkeypatch, requirements, capsys):
    monkeypatch.setattr(install_check, 'installed_paddle', lambda: stand_in_paddle('2.6.2', gpus=1))
    with pytest.raises(SystemExit) as exit_:
        install_check.main(['requirements', requirements])
    assert exit_.value.code == install_check.EXIT_REFUSED
    out, err = capsys.readouterr()
    assert out == '' and re.search(r'Paddle 2\.6\.2 \(a GPU build\).*paddlepaddle-gpu 3\.x', err)


def test_the_demo_and_the_test_environment_follow_the_paddle_build(monkeypatch, capsys):
    for paddle, processes, test_exit in ((None, 2, 0), (stand_in_paddle('3.3.1'), 2, 0),
                                         (stand_in_paddle('3.3.1', gpus=3), 3, 2)):
        monkeypatch.setattr(install_check, 'installed_paddle', lambda paddle=paddle: paddle)
        assert install_check.demo_processes() == processes
        assert install_check.main(['test-environment']) == test_exit
    assert 'python3 -m venv .venv-tests' in capsys.readouterr().err


def test_an_unknown_command_prints_the_usage(capsys):
    assert install_check.main(['install']) == install_check.EXIT_REFUSED
    assert 'install_check requirements FILE...' in capsys.readouterr().err
