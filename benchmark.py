"""Images/s and peak memory of every execution path, next to timm's BEiT of the same shape, in one run.

    python benchmark.py -cfg configs/beit_base_patch16_224.yaml -batch_size 8 -mode eval
    python benchmark.py -cfg configs/beit_base_patch16_224.yaml -batch_size 8 -mode train -backend dygraph timm

    python benchmark.py -cfg configs/beit_tiny_patch4_32.yaml -batch_size 32 -mode train -backend dygraph dygraph_ddp
    python benchmark.py -mode gemm
    python benchmark.py -cfg configs/beit_tiny_seg.yaml -task segmentation -batch_size 2 -mode train


Each path runs in a fresh child process (so its peak memory is its own): a few warm-up steps, then the median
of the timed steps. Where Paddle sees a GPU, every path runs on it, timm's included (so the ratios mean what they
mean on a CPU; the CPU-only inference paths are left out), and peak memory is read from each framework's device
allocator instead of the process's RSS. Paths: dygraph, static (paddle.jit.to_static), inference (Paddle Inference
fp32 with oneDNN, CPU only), inference_bf16 (oneDNN bfloat16, eval, on CPUs that support it), amp_o1 / amp_o2 (GPU
only, in AMP_DTYPE; O2 decorates the model as a run does, for evaluation too), dygraph_ddp (-nproc processes,
DataParallel; images/s of all of them, each process a -batch_size batch and its share of the CPU cores), timm and
timm_bf16 (torch autocast) when torch and timm are installed. Ratios are against timm fp32 of the same run;
dygraph_ddp is also compared with dygraph.

``-mode gemm`` measures the fp32 matmul behind BEiT-B's MLP (1576x768 @ 768x3072) in GFLOP/s: Paddle as this
project runs it (cpu_runtime applied), Paddle with MKL_DEBUG_CPU_TYPE unset, set to 5 before the first GEMM and
set only after it, next to torch and numpy. The CPU model and vendor head every table.

``-task segmentation`` (a config that sets SEG keys) measures BeitUperNet next to transformers'
BeitForSemanticSegmentation instead: paths dygraph, static and transformers, ratios against transformers (what is
timed: benchmark_seg.py).
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import benchmark_seg
from cpu_runtime import cpu_line
from procs import peak_memory_mb, start_peak_memory

GEMM_CASES = ('paddle', 'paddle_unset', 'paddle_avx2', 'paddle_avx2_after_first_gemm', 'torch', 'numpy')
GEMM_SHAPE = (1576, 768, 3072)
PADDLE_BACKENDS = ('dygraph', 'static', 'inference', 'inference_bf16', 'amp_o1', 'amp_o2', 'dygraph_ddp')
TIMM_BACKENDS = ('timm', 'timm_bf16')
EVAL_ONLY = ('inference', 'inference_bf16')
GPU_ONLY = ('amp_o1', 'amp_o2')
CPU_ONLY = ('inference', 'inference_bf16')  # inference.ExportedPredictor runs Paddle Inference on the CPU
TASK_BACKENDS = {'classification': PADDLE_BACKENDS + TIMM_BACKENDS, 'segmentation': benchmark_seg.SEG_BACKENDS}
MIB = 2 ** 20


def memory_meter(framework: str, device: str):
    """(start, peak): ``start()`` resets the peak and returns the memory in use, ``peak()`` the peak since, in MB.
    On a GPU, the framework's device allocator (RSS would count neither side's device memory)."""
    if device == 'cpu':
        return start_peak_memory, peak_memory_mb
    if framework == 'torch':
        import torch
        cuda = torch.cuda

        def start_torch() -> float:
            cuda.reset_peak_memory_stats()
            return cuda.memory_allocated() / MIB
        return start_torch, lambda: cuda.max_memory_allocated() / MIB
    import paddle
    cuda = paddle.device.cuda

    def start_paddle() -> float:
        cuda.reset_max_memory_allocated()
        return cuda.memory_allocated() / MIB
    return start_paddle, lambda: cuda.max_memory_allocated() / MIB


def benchmark_device() -> str:
    """'gpu' where Paddle sees one (every path then runs there), else 'cpu'."""
    import paddle
    return 'gpu' if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else 'cpu'


def torch_device(device: str) -> str:
    """Where timm runs: the device our paths run on, or no reference at all."""
    import torch
    if device == 'cpu':
        return 'cpu'
    if not torch.cuda.is_available():
        raise SystemExit('torch sees no GPU: timm would run on the CPU while Paddle runs on the GPU')
    return 'cuda'


def median_images_per_second(step, batch_size: int, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    return batch_size / statistics.median(durations)


def paddle_step(config, backend: str, mode: str, batch_size: int, *, processes: int = 1):
    """A function running one eval forward or one train step of our model on ``backend``."""
    import numpy as np
    import paddle

    from engine import Amp
    from job import build_model, decorate_o2
    from task_finetune import FINE_TUNING
    from utils import use_all_cpu_cores
    use_all_cpu_cores(processes)
    size = config.DATA.IMAGE_SIZE
    images = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
    amp_level = {'amp_o1': 'O1', 'amp_o2': 'O2'}.get(backend)
    amp = Amp(amp_level is not None, amp_level or 'O1', config.AMP_DTYPE)
    model = build_model(config, FINE_TUNING, amp)  # as a run builds it (cpu_ops' kernels on CPU, fused attention)
    if backend.startswith('inference'):
        from inference import exported_predictor
        predictor = exported_predictor(model, config, 'bf16' if backend == 'inference_bf16' else 'fp32')
        return lambda: predictor(images)
    if backend == 'static':
        spec = paddle.static.InputSpec([None, 3, size, size], 'float32')
        model = paddle.jit.to_static(model, input_spec=[spec], full_graph=True)
    inputs = paddle.to_tensor(images)
    if mode == 'eval':
        if amp.o2:  # as a run evaluates: parameters in AMP_DTYPE, the bias tables in float32
            model = decorate_o2(model, amp)
        model.eval()

        def eval_step():
            with paddle.no_grad(), amp.autocast():
                model(inputs).numpy()
        return eval_step
    labels = paddle.to_tensor(np.arange(batch_size) % config.MODEL.NUM_CLASSES)
    optimizer = paddle.optimizer.AdamW(1e-4, parameters=model.parameters(), weight_decay=0.05)
    if amp.o2:
        model, optimizer = decorate_o2(model, amp, optimizer)
    if processes > 1:
        model = paddle.DataParallel(model)
    model.train()

    def train_step():
        with amp.autocast():
            logits = model(inputs)
        loss = paddle.nn.functional.cross_entropy(logits.astype('float32'), labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        loss.item()
    return train_step


def timm_step(config, backend: str, mode: str, batch_size: int, *, processes: int = 1, device: str = 'cpu'):
    import torch
    from timm.models.beit import Beit

    from torch_checkpoint import timm_kwargs_from_config
    torch.set_num_threads(os.cpu_count() or 1)
    place = torch_device(device)
    size = config.DATA.IMAGE_SIZE
    model = Beit(**timm_kwargs_from_config(config)).to(place)
    inputs = torch.randn(batch_size, 3, size, size, device=place)
    autocast = torch.autocast(place, dtype=torch.bfloat16, enabled=backend == 'timm_bf16')
    if mode == 'eval':
        model.eval()

        def eval_step():
            with torch.no_grad(), autocast:
                model(inputs).float().cpu().numpy()
        return eval_step
    labels = torch.arange(batch_size, device=place) % config.MODEL.NUM_CLASSES
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4, weight_decay=0.05)
    model.train()

    def train_step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(inputs).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
    return train_step


def gemm_operands(case: str):
    """(a, b, matmul) of a GEMM case, with MKL_DEBUG_CPU_TYPE as the case says (the child starts without it)."""
    import numpy as np
    rows, inner, cols = GEMM_SHAPE
    a, b = (np.random.default_rng(0).standard_normal(shape).astype(np.float32) for shape in ((rows, inner),
                                                                                             (inner, cols)))
    if case == 'numpy':
        return a, b, np.matmul
    if case == 'torch':
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        return torch.from_numpy(a), torch.from_numpy(b), torch.matmul
    import paddle

    import cpu_runtime
    from utils import use_all_cpu_cores
    use_all_cpu_cores()
    a, b = paddle.to_tensor(a), paddle.to_tensor(b)
    if case == 'paddle':
        cpu_runtime.use_fast_blas_kernels()
    elif case == 'paddle_avx2_after_first_gemm':
        paddle.matmul(a, b).numpy()
    if case.startswith('paddle_avx2'):
        os.environ[cpu_runtime.MKL_CPU_TYPE_VARIABLE] = cpu_runtime.MKL_AVX2
    return a, b, paddle.matmul


def measure_gemm(args) -> dict:
    """In the child process: the best of 5 rounds of 10 GEMMs, in GFLOP/s."""
    a, b, matmul = gemm_operands(args.child)
    rows, inner, cols = GEMM_SHAPE
    best = 0.0
    for _ in range(5):
        matmul(a, b)
        start = time.perf_counter()
        for _ in range(10):
            out = matmul(a, b)
        float(out[0, 0])  # waits for the last one
        best = max(best, 2 * rows * inner * cols * 10 / (time.perf_counter() - start) / 1e9)
    return {'backend': args.child, 'gflops': best}


def print_gemm_table(rows: list) -> None:
    rows_, inner, cols = GEMM_SHAPE
    print(f'fp32 matmul {rows_}x{inner} @ {inner}x{cols}, best of 5 rounds of 10')
    for row in rows:
        print(f'{row["backend"]:<30}' + (f'  failed: {row["error"]}' if 'error' in row
                                          else f'{row["gflops"]:>8.0f} GFLOP/s'))


def _data_parallel_worker(args, result_path: str) -> None:
    """One of ``args.nproc`` spawned processes; the first writes the images/s of all of them."""
    import paddle.distributed as dist
    dist.init_parallel_env()
    args.child = 'dygraph'
    result = measure(args, processes=args.nproc)
    if dist.get_rank() == 0:
        result.update(backend='dygraph_ddp', images_per_sec=result['images_per_sec'] * args.nproc)
        with open(result_path, 'w') as f:
            json.dump(result, f)


def measure_data_parallel(args) -> dict:
    """In the child process: the dygraph step on ``args.nproc`` processes (DataParallel, gloo on CPU)."""
    import paddle.distributed as dist
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, 'result.json')
        dist.spawn(_data_parallel_worker, args=(args, result_path), nprocs=args.nproc)
        with open(result_path) as f:
            return json.load(f)


def step_builder(args) -> tuple:
    """(the step builder of ``args.child``, its framework), the framework imported before the meter starts."""
    if args.child in TIMM_BACKENDS:
        import timm.models.beit  # noqa: F401
        return functools.partial(timm_step, device=args.device), 'torch'
    if args.child == benchmark_seg.REFERENCE:
        import transformers.models.beit.modeling_beit  # noqa: F401
        return functools.partial(benchmark_seg.transformers_seg_step, place=torch_device(args.device)), 'torch'
    import paddle

    import job  # noqa: F401
    paddle.set_device(args.device)  # before the meter starts: Paddle's allocator reads the current device
    return (benchmark_seg.paddle_seg_step if args.task == 'segmentation' else paddle_step), 'paddle'


def load_config(args):
    """``-cfg`` with ``-opts`` applied, checked."""
    from config import get_config, merge_opts, validate_config
    config = get_config(args.cfg)
    merge_opts(config, args.opts)
    validate_config(config)
    return config


def measure(args, processes: int = 1) -> dict:
    """In the child process: one backend, one mode."""
    config = load_config(args)
    config.MODEL.DROPPATH = 0.0  # the same work in every step
    if args.task == 'segmentation':
        benchmark_seg.same_work(config)
    build, framework = step_builder(args)
    start_memory, peak_memory = memory_meter(framework, args.device)
    framework_mb = start_memory()  # counted out: the frameworks' own import footprints differ
    step = build(config, args.child, args.mode, args.batch_size, processes=processes)
    rate = median_images_per_second(step, args.batch_size, args.warmup, args.steps)
    return {'backend': args.child, 'images_per_sec': rate, 'peak_mb': peak_memory() - framework_mb}


def available_backends(mode: str, device: str, task: str) -> list:
    if task == 'segmentation':
        return _available_seg_backends()
    from inference import bf16_supported
    backends = [b for b in PADDLE_BACKENDS if not (mode == 'train' and b in EVAL_ONLY) and b != 'dygraph_ddp']
    backends = [b for b in backends if b not in (GPU_ONLY if device == 'cpu' else CPU_ONLY)]
    if not bf16_supported():
        backends = [b for b in backends if b != 'inference_bf16']
    try:
        import timm  # noqa: F401
        backends += list(TIMM_BACKENDS)
    except ImportError:
        print('timm not installed: no reference column', file=sys.stderr)
    return backends


def _available_seg_backends() -> list:
    backends = [b for b in benchmark_seg.SEG_BACKENDS if b != benchmark_seg.REFERENCE]
    try:
        import transformers  # noqa: F401
        backends.append(benchmark_seg.REFERENCE)
    except ImportError:
        print('transformers not installed: no reference column', file=sys.stderr)
    return backends


def child_command(args, backend: str) -> list:
    opts = ['-opts', *args.opts] if args.opts else []
    return [sys.executable, os.path.abspath(__file__), '-cfg', args.cfg, '-batch_size', str(args.batch_size),
            '-mode', args.mode, '-warmup', str(args.warmup), '-steps', str(args.steps), '-nproc', str(args.nproc),
            '-task', args.task, '-device', args.device, '-child', backend, *opts]


def run_child(args, backend: str) -> dict:
    command = child_command(args, backend)
    env = dict(os.environ)
    if args.mode == 'gemm':  # each case sets the variable itself
        env.pop('MKL_DEBUG_CPU_TYPE', None)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
    if result.returncode or not lines:
        return {'backend': backend, 'error': (result.stderr.strip().splitlines() or ['failed'])[-1]}
    return json.loads(lines[-1])


def print_table(rows: list, args) -> None:
    name = benchmark_seg.REFERENCE if args.task == 'segmentation' else 'timm'
    reference = next((r for r in rows if r['backend'] == name and 'error' not in r), None)
    where = f'{os.cpu_count()} cores' if args.device == 'cpu' else 'on the GPU'
    peak = 'RSS growth after import' if args.device == 'cpu' else "device allocator's, after import"
    task = 'segmentation ' if args.task == 'segmentation' else ''
    print(f'{task}{args.mode}, {os.path.basename(args.cfg)}, batch {args.batch_size}, {where}, '
          f'median of {args.steps} steps after {args.warmup} warm-up')
    ratio = f'x {name}'
    width = len(ratio) + 2
    print(f'{"backend":<16}{"img/s":>9}{ratio:>{width}}{"peak MB":>10}{ratio:>{width}}   (peak: {peak})')
    for row in rows:
        if 'error' in row:
            print(f'{row["backend"]:<16}  failed: {row["error"]}')
            continue
        speed = row['images_per_sec'] / reference['images_per_sec'] if reference else float('nan')
        memory = row['peak_mb'] / reference['peak_mb'] if reference else float('nan')
        print(f'{row["backend"]:<16}{row["images_per_sec"]:>9.2f}{speed:>{width}.2f}{row["peak_mb"]:>10.0f}'
              f'{memory:>{width}.2f}')
    _print_scaling(rows, args)


def _print_scaling(rows: list, args) -> None:
    measured = {row['backend']: row['images_per_sec'] for row in rows if 'error' not in row}
    if 'dygraph' in measured and 'dygraph_ddp' in measured:
        print(f'dygraph_ddp: {args.nproc} processes give {measured["dygraph_ddp"] / measured["dygraph"]:.2f}x the '
              'images/s of one dygraph process')

def check_choices(parser: argparse.ArgumentParser, args) -> None:
    """Refuse (exit 2, before any child starts) a backend the task or mode has not, a segmentation run of
    a classification config or the reverse, and a segmentor transformers cannot express."""
    if args.mode == 'gemm' and args.task != 'classification':
        parser.error('-mode gemm measures a matmul: it takes no -task')
    choices, what = (GEMM_CASES, '-mode gemm') if args.mode == 'gemm' else (TASK_BACKENDS[args.task], args.task)
    unknown = [backend for backend in args.backend or () if backend not in choices]
    if unknown:
        parser.error(f'-backend {" ".join(unknown)}: no such path of {what} (choose from {", ".join(choices)})')
    if args.mode != 'gemm':
        _check_config_task(parser, args)


def _check_config_task(parser: argparse.ArgumentParser, args) -> None:
    from errors import BadInputError
    from seg_checkpoints import check_transformers_can_express
    try:
        config = load_config(args)
        segmentation = benchmark_seg.is_segmentation_config(config)
        if segmentation != (args.task == 'segmentation'):
            parser.error(f'{args.cfg}: ' + ('a segmentation config (it sets SEG keys): add -task segmentation'
                                             if segmentation else
                                             'a classification config (it sets no SEG key): -task segmentation needs '
                                             'a segmentor\'s config, e.g. configs/beit_tiny_seg.yaml'))
        if segmentation and benchmark_seg.REFERENCE in (args.backend or (benchmark_seg.REFERENCE,)):
            check_transformers_can_express(config)
        if segmentation and args.mode == 'train' and args.batch_size < benchmark_seg.MIN_TRAIN_BATCH:
            parser.error(f'-task segmentation -mode train needs -batch_size {benchmark_seg.MIN_TRAIN_BATCH} or more '
                         '(one image gives the pyramid pooling\'s BatchNorm one value per channel)')
    except BadInputError as error:
        parser.error(f'{args.cfg}: {error}')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('BEiT speed and memory, next to timm')
    parser.add_argument('-cfg', default='configs/beit_base_patch16_224.yaml')
    parser.add_argument('-batch_size', type=int, default=8)
    parser.add_argument('-mode', choices=('eval', 'train', 'gemm'), default='eval')
    parser.add_argument('-backend', nargs='+', default=None, help='paths to measure (default: all available)')
    parser.add_argument('-warmup', type=int, default=3)
    parser.add_argument('-steps', type=int, default=10)
    parser.add_argument('-nproc', type=int, default=2, help='processes of the dygraph_ddp path')
    parser.add_argument('-task', choices=tuple(TASK_BACKENDS), default='classification',
                        help='segmentation: BeitUperNet of a config with SEG keys, next to transformers')
    parser.add_argument('-opts', nargs='+', action='extend', default=[], metavar='KEY VALUE',
                        help='config overrides, e.g. DATA.IMAGE_SIZE 256')
    parser.add_argument('-device', choices=('cpu', 'gpu'), default='cpu', help=argparse.SUPPRESS)  # the parent's
    parser.add_argument('-child', default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.child == 'dygraph_ddp':
        print(json.dumps(measure_data_parallel(args)))
    elif args.child in GEMM_CASES:
        print(json.dumps(measure_gemm(args)))
    elif args.child:
        print(json.dumps(measure(args)))
    elif args.mode == 'gemm':
        check_choices(parser, args)
        print(cpu_line())
        print_gemm_table([run_child(args, case) for case in (args.backend or GEMM_CASES)])
    else:
        check_choices(parser, args)
        print(cpu_line())
        args.device = benchmark_device()  # for every child
        backends = args.backend or available_backends(args.mode, args.device, args.task)
        print_table([run_child(args, backend) for backend in backends], args)


if __name__ == '__main__':
    main()
