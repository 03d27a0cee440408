"""minildm's UNet vs diffusers' UNet2DModel on this CPU: training step and sampling step.

Both models are built at the same configuration (channels 32/64/128, 2 ResBlocks per
level, self-attention at the lowest resolution 8x8 only (and in the middle), GroupNorm
with 8 groups, 4 heads, 3x32x32 inputs, batch 64) and timed in alternating turns in one
process, after warm-up; each number is the median of --repeats timings.

    train:  forward, MSE loss, backward, AdamW step (fused=True, the fastest on CPU)
    sample: one forward pass under torch.inference_mode (one step of a sampler)

Settings: fp32 or bf16 autocast, NCHW or channels_last, and bf16 weights (sampling
only); each model's fastest is compared with diffusers in fp32. FLOPs per step come from
torch.utils.flop_counter.FlopCounterMode; the "peak" is the best FLOP/s this process
reaches on a large matmul or a large conv in the same dtype (a practical peak, measured,
not the datasheet one).

By default the script re-executes itself with glibc malloc tuned to keep freed memory
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_): without it, every large activation of a
training step is a fresh mmap whose page faults cost more than the convolutions on this
VM. The setting applies to both models alike; --default-malloc turns it off.

    python benchmarks/bench_unet.py                                   # idle machine: wall clock
    python benchmarks/bench_unet.py --threads 1 --clock cpu           # shared machine (BENCHMARKS.md)
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

# glibc malloc tunables must be in the environment before the process starts
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34),
              "MALLOC_TOP_PAD_": str(2**30)}

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minildm.nn import count_params
from minildm.unet import UNet, UNetConfig

BATCH, IMAGE = 64, 32


@dataclass
class Setting:
    name: str
    autocast: bool  # torch.autocast("cpu", dtype=torch.bfloat16) around the forward and the loss
    channels_last: bool  # model and input in torch.channels_last memory format
    bf16_weights: bool = False  # model.to(torch.bfloat16): sampling only (AdamW on bf16 weights is unsound)


SETTINGS = [Setting("fp32", False, False), Setting("fp32 + channels_last", False, True),
            Setting("bf16 autocast", True, False), Setting("bf16 autocast + channels_last", True, True),
            Setting("bf16 weights + channels_last", False, True, bf16_weights=True)]


def build_minildm() -> nn.Module:
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_ch=3, out_ch=3, ch=32, ch_mult=(1, 2, 4), num_res_blocks=2,
                            attn_resolutions=(8,), heads=4, dropout=0.0, groups=8, image_size=IMAGE))
    # minildm zero-initialises the last layer of every residual branch and conv_out; give
    # them PyTorch's default init so the output (and the bf16 error check) is not trivially 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and torch.count_nonzero(m.weight) == 0:
            m.reset_parameters()
    return model


def build_diffusers() -> nn.Module:
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=IMAGE, in_channels=3, out_channels=3, block_out_channels=(32, 64, 128),
                       layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=32, dropout=0.0)  # 128 / 32 = 4 heads, like minildm


def predict(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Both models' forward as eps = model(x, t); diffusers wraps its output in .sample."""
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def make_steps(model: nn.Module, s: Setting) -> tuple[Callable[[], None] | None, Callable[[], None]]:
    """(train_step, sample_step) closures for `model` under setting `s`; no train_step for bf16 weights."""
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    dtype = torch.bfloat16 if s.bf16_weights else torch.float32
    model = model.to(dtype=dtype, memory_format=fmt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).to(dtype).contiguous(memory_format=fmt)
    eps = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused: fastest on CPU

    def train_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.autocast):
            loss = F.mse_loss(predict(model, x, t).float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample_step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.autocast):
            predict(model, x, t)

    return (None if s.bf16_weights else train_step), sample_step


def time_alternating(steps: dict[str, Callable[[], None]], warmup: int, repeats: int,
                     clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds per call of each step by `clock`, calling them in turns (a, b, a, b, ...)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def best_rate(fn: Callable[[], torch.Tensor], flops: float, clock: Callable[[], float], repeats: int = 10) -> float:
    """Best achieved FLOP/s of fn() over `repeats` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return flops / best


def practical_peak(dtype: torch.dtype, clock: Callable[[], float]) -> tuple[float, float]:
    """(matmul, conv) best FLOP/s in `dtype`: a 2048^3 matmul and a 128->128 3x3 conv on
    (64, 128, 32, 32) channels_last. Their max is this process's practical peak: measured,
    not the datasheet's. (MKL's fp32 GEMM is slow on AMD CPUs, oneDNN's conv is not.)"""
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x = torch.randn(64, 128, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return (best_rate(lambda: a @ b, 2 * n**3, clock),
            best_rate(lambda: F.conv2d(x, w, padding=1), 2 * 64 * 128 * 128 * 9 * 32 * 32, clock))


def count_flops(model: nn.Module, train: bool) -> int:
    """FLOPs of one forward (sample) or forward + backward (train) at batch BATCH."""
    x, t = torch.randn(BATCH, 3, IMAGE, IMAGE), torch.randint(0, 1000, (BATCH,)).float()
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            F.mse_loss(predict(model, x, t), torch.randn_like(x)).backward()
        else:
            with torch.no_grad():
                predict(model, x, t)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bf16_rel_error(model: nn.Module, s: Setting) -> float:
    """||y_bf16 - y_fp32|| / ||y_fp32|| for one batch: setting `s` vs plain fp32, same input."""
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 1000, (BATCH,), generator=g).float()
    with torch.inference_mode():
        y32 = predict(model, x, t)
        low = copy.deepcopy(model).to(torch.bfloat16) if s.bf16_weights else model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.autocast):
            y16 = predict(low, x.to(torch.bfloat16) if s.bf16_weights else x, t).float()
    return ((y16 - y32).norm() / y32.norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model, setting and mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: time.perf_counter; cpu: time.process_time, robust on a shared machine with --threads 1")
    p.add_argument("--default-malloc", action="store_true", help="do not tune glibc malloc")
    args = p.parse_args()
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # silence the note on .to(torch.bfloat16)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"python {platform.python_version()}, threads {torch.get_num_threads()}, clock {args.clock}, "
          f"malloc {'default' if args.default_malloc else 'tuned'}, batch {BATCH}, repeats {args.repeats}")
    print(f"cpu: {cpu_name()}; load average at start: {load_average()}")

    # 1. matched models
    mine, theirs = build_minildm(), build_diffusers()
    n_mine, n_theirs = count_params(mine), count_params(theirs)
    print(f"parameters: minildm {n_mine:,}, diffusers {n_theirs:,} (ratio {n_mine / n_theirs:.3f})")
    assert abs(n_mine / n_theirs - 1) < 0.10, "the configurations are not matched"

    # 2. numerical soundness of bf16, FLOPs, practical peak
    for s in (SETTINGS[2], SETTINGS[4]):
        print(f"{s.name} vs fp32 output, relative L2 error: minildm {bf16_rel_error(mine, s):.2e}, "
              f"diffusers {bf16_rel_error(theirs, s):.2e}")
    flops = {(name, mode): count_flops(m, mode == "train")
             for name, m in (("minildm", mine), ("diffusers", theirs)) for mode in ("train", "sample")}
    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        mm, conv = practical_peak(dtype, clock)
        peak[dtype] = max(mm, conv)
        print(f"practical peak {dtype}: matmul {mm / 1e9:.0f} GFLOP/s, conv {conv / 1e9:.0f} GFLOP/s")
    for mode in ("train", "sample"):
        print(f"FLOPs per {mode} step: minildm {flops['minildm', mode] / 1e9:.1f} G, "
              f"diffusers {flops['diffusers', mode] / 1e9:.1f} G")

    # 3. timings, both models in turns, for every setting
    results = {}  # (setting name, mode, model name) -> seconds
    for s in SETTINGS:
        mine_train, mine_sample = make_steps(build_minildm(), s)
        their_train, their_sample = make_steps(build_diffusers(), s)
        for mode, steps in (("train", {"minildm": mine_train, "diffusers": their_train}),
                            ("sample", {"minildm": mine_sample, "diffusers": their_sample})):
            if None in steps.values():
                continue
            for name, sec in time_alternating(steps, args.warmup, args.repeats, clock).items():
                results[s.name, mode, name] = sec
            a, b = results[s.name, mode, "minildm"], results[s.name, mode, "diffusers"]
            print(f"  {s.name:30s} {mode:6s} minildm {a * 1e3:7.0f} ms  diffusers {b * 1e3:7.0f} ms  "
                  f"diffusers/minildm {b / a:.2f}x", flush=True)
    print(f"load average at end: {load_average()}")

    # 4. summary: each model's fp32 and fastest setting, speed-up over diffusers fp32, % of peak
    print("\n| mode | model | setting | median ms/step | speed-up vs diffusers fp32 | GFLOP/s | % of practical peak |")
    print("|---|---|---|---:|---:|---:|---:|")
    by_name = {s.name: s for s in SETTINGS}
    for mode in ("train", "sample"):
        base = results["fp32", mode, "diffusers"]
        for name in ("minildm", "diffusers"):
            timed = [s.name for s in SETTINGS if (s.name, mode, name) in results]
            best = min(timed, key=lambda k: results[k, mode, name])
            for setting in dict.fromkeys(["fp32", best]):
                sec = results[setting, mode, name]
                rate = flops[name, mode] / sec
                low = by_name[setting].autocast or by_name[setting].bf16_weights
                print(f"| {mode} | {name} | {setting} | {sec * 1e3:.0f} | {base / sec:.2f}x | {rate / 1e9:.0f} | "
                      f"{100 * rate / peak[torch.bfloat16 if low else torch.float32]:.0f}% |")
    for mode in ("train", "sample"):
        base = results["fp32", mode, "diffusers"]
        fp32 = base / results["fp32", mode, "minildm"]
        best = base / min(sec for (_, m, n), sec in results.items() if m == mode and n == "minildm")
        print(f"goal {mode}: minildm fp32 vs diffusers fp32 {fp32:.2f}x (want >= 1), "
              f"minildm best vs diffusers fp32 {best:.2f}x (want >= 2)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        return f"{name}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
