"""Start-up and memory of a multi-process run on an ImageNet-sized list: seconds to the first logged step, and
USS / PSS of every process and loader worker at that step and after more steps.

    python benchmark_startup.py -root /tmp/imagenet_synthetic [-ngpus 2] [-steps 200] [-repo .]

Builds (once, then reuses) a synthetic ImageNet-1k set under -root: one small real JPEG per class folder and
hard links to it for the other images of the class (ext4 allows 65,000 links per file; a class has at most 1,300),
with train_list.txt (1,281,167 lines) and val_list.txt (50,000). Then runs ``main_multi_gpu.py -ngpus N`` of
-repo (another checkout measures another version) on the tiny config with 2 loader workers per process and
reads /proc/PID/smaps_rollup of the whole process tree. USS is a process's private memory; PSS adds its share
of the pages it shares.
"""
import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from procs import children

IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
STEP_LINE = re.compile(r' step (\d+)/')


def _class_counts(total: int, classes: int) -> list[int]:
    return [total // classes + (label < total % classes) for label in range(classes)]


def write_split(root: str, split: str, total: int, classes: int) -> None:
    """``classes`` folders, each one JPEG and hard links to it, and the list naming all of them."""
    rng = np.random.default_rng(classes)
    lines = []
    for label, count in enumerate(_class_counts(total, classes)):
        folder = os.path.join(root, split, f'n{label:08d}')
        os.makedirs(folder, exist_ok=True)
        first = os.path.join(folder, 'img_0.JPEG')
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(first, quality=90)
        for index in range(count):
            name = f'img_{index}.JPEG'
            if index:
                os.link(first, os.path.join(folder, name))
            lines.append(f'{split}/n{label:08d}/{name} {label}\n')
    with open(os.path.join(root, f'{split}_list.txt'), 'w', encoding='utf-8') as f:
        f.writelines(lines)


def ensure_dataset(root: str, num_train: int, num_val: int, classes: int) -> None:
    done = os.path.join(root, 'complete')
    if os.path.exists(done):
        return
    start = time.time()
    write_split(root, 'train', num_train, classes)
    write_split(root, 'val', num_val, classes)
    open(done, 'w').close()
    print(f'built {num_train} + {num_val} images in {classes} classes under {root} in {time.time() - start:.0f} s')


def process_tree(pid: int, depth: int = 0) -> list[tuple[int, int]]:
    """(pid, depth) of ``pid`` and its descendants, parents first."""
    tree = [(pid, depth)]
    for child in children(pid):
        tree += process_tree(child, depth + 1)
    return tree


def memory_mb(pid: int) -> tuple[str, float, float] | None:
    """(command, USS MB, PSS MB) of a live process."""
    try:
        with open(f'/proc/{pid}/smaps_rollup') as f:
            fields = {line.split(':')[0]: int(line.split()[1]) for line in f if line.strip().endswith('kB')}
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            command = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
    except (OSError, ValueError):
        return None
    uss = fields.get('Private_Clean', 0) + fields.get('Private_Dirty', 0)
    return command, uss / 1024, fields.get('Pss', 0) / 1024


ROLES = ('launching process', 'training process', 'loader worker')


def print_memory(label: str, pid: int) -> None:
    """Every Python process of the run (the launcher, its training processes, their loader workers) and the sum."""
    print(f'{label}:')
    total_uss = total_pss = 0.0
    for child, depth in process_tree(pid):
        found = memory_mb(child)
        if found is None or 'resource_tracker' in found[0]:
            continue
        _, uss, pss = found
        total_uss, total_pss = total_uss + uss, total_pss + pss
        print(f'  {"  " * depth}{ROLES[min(depth, 2)]:<18} pid {child:>7}  USS {uss:7.0f} MB  PSS {pss:7.0f} MB')
    print(f'  all processes: USS {total_uss:.0f} MB, PSS {total_pss:.0f} MB')


def wait_for_step(log: str, step: int, process: subprocess.Popen, timeout: float) -> float:
    """Seconds until log.txt shows a step line of ``step`` or later."""
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f'the run ended (exit {process.returncode}) before step {step}')
        if os.path.exists(log):
            with open(log, encoding='utf-8') as f:
                if any(int(match) >= step for match in STEP_LINE.findall(f.read())):
                    return time.time()
        time.sleep(0.05)
    raise RuntimeError(f'no step {step} in {log} after {timeout} s')


def measure(args) -> None:
    output = tempfile.mkdtemp(prefix='beit-startup-')
    command = [sys.executable, os.path.join(args.repo, 'main_multi_gpu.py'), '-cfg',
               os.path.join(args.repo, 'configs', 'beit_tiny_patch4_32.yaml'), '-data_path', args.root,
               '-ngpus', str(args.ngpus), '-num_classes', str(args.classes), '-batch_size', '32', '-output', output,
               '-opts', 'DATA.NUM_WORKERS', '2', 'REPORT_FREQ', '1', 'TRAIN.NUM_EPOCHS', '1']
    log = os.path.join(output, 'log.txt')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    start = time.time()
    process = subprocess.Popen(command, cwd=args.repo, env=env, stdout=subprocess.DEVNULL)
    try:
        first = wait_for_step(log, 1, process, args.timeout)
        print(f'{args.repo}: first logged step {first - start:.1f} s after launch ({args.ngpus} processes)')
        print_memory('memory at the first step', process.pid)
        later = wait_for_step(log, args.steps, process, args.timeout)
        print_memory(f'memory at step {args.steps} ({later - first:.0f} s later)', process.pid)
    finally:
        for pid, _ in reversed(process_tree(process.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser('Start-up time and memory on an ImageNet-sized list')
    parser.add_argument('-root', default=os.path.join(tempfile.gettempdir(), 'imagenet_synthetic'))
    parser.add_argument('-repo', default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument('-ngpus', type=int, default=2)
    parser.add_argument('-steps', type=int, default=200)
    parser.add_argument('-num_train', type=int, default=IMAGENET_TRAIN)
    parser.add_argument('-num_val', type=int, default=IMAGENET_VAL)
    parser.add_argument('-classes', type=int, default=IMAGENET_CLASSES)
    parser.add_argument('-timeout', type=float, default=600)
    args = parser.parse_args()
    args.repo = os.path.abspath(args.repo)
    ensure_dataset(args.root, args.num_train, args.num_val, args.classes)
    measure(args)


if __name__ == '__main__':
    main()
