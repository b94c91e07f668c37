"""Does flash-linear-attention's gated delta rule (forward and backward) agree with transformers'
PyTorch reference on Qwen3.5-0.8B's linear-attention layers, and how much faster is it?

    python benchmarks/check_delta_rule.py                      # on a CUDA GPU with fla installed
    python benchmarks/check_delta_rule.py --tokens 1380 4096 --batch 2
    python benchmarks/check_delta_rule.py --self-check         # CPU: the harness, reference vs recurrence

Prints the environment (GPU, torch, Triton, fla, causal-conv1d and which kernels transformers will
call), then one row per (dtype, tokens): the relative error ‖fla − reference‖ / ‖reference‖ of the
output and of the gradients of q, k, v, g and beta, against the tolerance of
``lightning_modules.backbones.kernels.TOLERANCE``, and the forward+backward time of both. Exits 1
when a tensor is out of tolerance, so it can gate a pinned version (Hopper backward bugs:
fla-org/flash-linear-attention#640).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_modules.backbones import kernels
from lightning_modules.backbones.registry import get_preset


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def environment(device: str) -> str:
    gpu = "-"
    if device.startswith("cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    return (f"device {device}, GPU {gpu}, torch {torch.__version__}, triton {version('triton')}, "
            f"flash-linear-attention {version('flash-linear-attention')}, fla-core {version('fla-core')}, "
            f"causal-conv1d {version('causal-conv1d')}\nkernels transformers will call: "
            f"{kernels.fast_kernels_status().describe()}")


def step_time(fn: Callable[..., Any], shape: kernels.DeltaRuleShape, dtype: torch.dtype, device: str,
              repeats: int) -> float:
    """Median seconds of one forward + backward."""
    inputs = kernels.delta_rule_inputs(shape, dtype, device)
    times = []
    for _ in range(repeats + 1):
        leaves = [inputs[k].detach().requires_grad_() for k in ("q", "k", "v", "g", "beta")]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out, _ = fn(*leaves[:3], g=leaves[3], beta=leaves[4], use_qk_l2norm_in_kernel=True)
        out.backward(inputs["do"].to(out.dtype))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[5 * 256 + 100, 4096],
                   help="sequence lengths (default: a ProCIR query with five 512² views, and 4096)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--self-check", action="store_true",
                   help="compare the reference with transformers' token-by-token recurrence instead of fla "
                        "(runs on a CPU; checks this script, not a kernel)")
    args = p.parse_args()

    print(environment(args.device))
    text = get_preset("qwen3.5", "qwen3.5-0.8b-random").config["text"]
    fast: Callable[..., Any] | None = None
    name = "fla"
    if args.self_check:
        from transformers.models.qwen3_5 import modeling_qwen3_5
        fast = kernels.reference_implementation(modeling_qwen3_5.torch_recurrent_gated_delta_rule)
        name = "recurrence"
    elif not (args.device.startswith("cuda") and torch.cuda.is_available()) or not kernels.fast_kernels_status(
    ).packages["fla"].importable:
        print("\nskipped: the check needs a CUDA GPU and flash-linear-attention (or --self-check)")
        return 0
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fast

    from transformers.models.qwen3_5 import modeling_qwen3_5
    reference = kernels.reference_implementation(modeling_qwen3_5.torch_chunk_gated_delta_rule)
    print(f"\nQwen3.5-0.8B linear attention: {text['linear_num_key_heads']} key / {text['linear_num_value_heads']} "
          f"value heads of {text['linear_key_head_dim']}/{text['linear_value_head_dim']}, batch {args.batch}; "
          f"relative error of {name} vs the fp32 reference\n")
    print("| dtype | tokens | " + " | ".join(kernels.CHECKED) + " | tolerance | ok | "
          f"{name} fwd+bwd (ms) | reference fwd+bwd (ms) | speed-up |")
    print("|---|---:|" + "---:|" * len(kernels.CHECKED) + "---:|---|---:|---:|---:|")
    failed = False
    for dtype in (torch.bfloat16, torch.float32):
        for tokens in args.tokens:
            shape = kernels.DeltaRuleShape(args.batch, tokens, text["linear_num_key_heads"],
                                           text["linear_num_value_heads"], text["linear_key_head_dim"],
                                           text["linear_value_head_dim"])
            errors = kernels.check_delta_rule(shape, dtype, args.device, fast=fast)
            ok = all(e <= kernels.TOLERANCE[dtype] for e in errors.values())
            failed |= not ok
            t_fast = step_time(fast, shape, dtype, args.device, args.repeats)
            t_ref = step_time(reference, shape, dtype, args.device, args.repeats)
            cells = " | ".join(f"{errors[k]:.1e}" for k in kernels.CHECKED)
            print(f"| {str(dtype).removeprefix('torch.')} | {tokens} | {cells} | {kernels.TOLERANCE[dtype]:.0e} | "
                  f"{'yes' if ok else 'NO'} | {1e3 * t_fast:.2f} | {1e3 * t_ref:.2f} | {t_ref / t_fast:.1f}x |",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
