"""Peak memory the pre-training loss adds: cross entropy of [rows, classes] float32 logits (BEiT-B at batch 128:
about 9,600 masked patches x 8,192 visual tokens), forward and backward, next to torch's cross entropy.

    python benchmark_loss.py                      # 9600 x 8192
    python benchmark_loss.py -rows 2000 -classes 1000

Each case runs in a fresh child process: the logits (and labels) are made first, then the peak RSS is reset
(Linux clear_refs) and the loss and its backward run; the growth of the peak RSS is what they added, the logits'
gradient included. It is printed in MB and in copies of the logits.
"""
import argparse
import json
import os
import subprocess
import sys

from cpu_runtime import cpu_line
from procs import peak_memory_mb, start_peak_memory

CASES = ('ours', 'torch')


def measure(case: str, rows: int, classes: int) -> dict:
    """In the child: the peak RSS growth of one loss forward and backward, in MB."""
    import numpy as np
    logits = np.random.default_rng(0).standard_normal((rows, classes), dtype=np.float32) * 4
    labels = np.random.default_rng(1).integers(0, classes, rows)
    if case == 'torch':
        import torch
        logits, labels = torch.from_numpy(logits).requires_grad_(), torch.from_numpy(labels)
        loss_of = torch.nn.functional.cross_entropy
        loss_of(logits[:2], labels[:2]).backward()  # kernels loaded before the measurement
        logits.grad = None
    else:
        import paddle

        from losses import cross_entropy as loss_of
        logits, labels = paddle.to_tensor(logits, stop_gradient=False), paddle.to_tensor(labels)
        loss_of(logits[:2], labels[:2]).backward()
        logits.clear_gradient(set_to_zero=False)
    start = start_peak_memory()
    loss = loss_of(logits, labels)
    loss.backward()
    return {'case': case, 'loss': float(loss), 'peak_mb': peak_memory_mb() - start}


def run_child(case: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), '-rows', str(args.rows), '-classes', str(args.classes),
               '-child', case]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
    if result.returncode or not lines:
        return {'case': case, 'error': (result.stderr.strip().splitlines() or ['failed'])[-1]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser('peak memory of the cross entropy, forward and backward')
    parser.add_argument('-rows', type=int, default=9600)
    parser.add_argument('-classes', type=int, default=8192)
    parser.add_argument('-case', nargs='+', choices=CASES, default=list(CASES))
    parser.add_argument('-child', choices=CASES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.classes)))
        return
    copy_mb = args.rows * args.classes * 4 / 2**20
    print(cpu_line())
    print(f'cross entropy of [{args.rows}, {args.classes}] float32 logits ({copy_mb:.0f} MB), forward + backward; '
          'peak RSS growth, the gradient included')
    for row in (run_child(case, args) for case in args.case):
        if 'error' in row:
            print(f'{row["case"]:<8}failed: {row["error"]}')
        else:
            print(f'{row["case"]:<8}{row["peak_mb"]:>9.0f} MB {row["peak_mb"] / copy_mb:>6.2f} copies  '
                  f'(loss {row["loss"]:.4f})')


if __name__ == '__main__':
    main()
