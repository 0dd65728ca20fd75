"""Where the time of a mixed-adapter call goes on the CPU (issue 23): the layers of the call timed in one process.

One PEFT ``lora.Linear`` (K = N = 1024, r = 16, fp32) holding n adapters, 512 rows spread evenly over them, inference
(``torch.no_grad``). Timed around the frozen layer, in a random order per round (medians over the rounds):

  frozen         the base nn.Linear alone
  mixed_forward  the PyTorch implementation of the op on the packed adapters (gathers, base GEMM, batched products)
  op             the op protocol's call (checks, autocast, dispatch) around it
  peft_call      the accelerated layer called as PEFT's users call it: layer(x, adapter_names=names)
  peft_loop      PEFT's own mixed batch (its loop over the adapters)

    flock /tmp/fastlora-bench.lock python benchmarks/mixed_profile.py --adapters 1,16,64

benchmarks/mixed_check.py is the benchmark (interleaved rounds against PEFT, the goals); this script only splits a
call into its layers. Numbers from it are in NOTES.md ("Mixed-adapter batches").
"""
from __future__ import annotations

import argparse
import random
import time
import warnings

import torch


def profile(n: int, rounds: int, M: int = 512, K: int = 1024, N: int = 1024, r: int = 16) -> dict:
    import mixed_check

    from fastlora.bench.timing import steady_allocator
    from fastlora.mixed import MIXED_LORA_LINEAR, scalings_tensor
    from fastlora.mixed_reference import mixed_forward
    from fastlora.peft_interop import mixed as peft_mixed

    steady_allocator()
    layer = mixed_check.mixed_layer(K, N, [r] * n, torch.float32, "cpu")
    names = [f"a{i % n}" for i in range(M)]
    x = torch.randn(M, K)
    W = layer.base_layer.weight
    with torch.no_grad():
        layer(x, adapter_names=names)  # builds the layer's adapter bank
        bank = layer.__dict__[peft_mixed._BANK]
        index = peft_mixed._sample_index(peft_mixed._names(names), bank.names, x.device)
        s = scalings_tensor([layer.scaling[a] for a in bank.names], x.device)
        ps = [0.0] * len(bank.names)
        calls = {
            "frozen": lambda: layer.base_layer(x),
            "mixed_forward": lambda: mixed_forward(x, W, None, bank.A, bank.B, index, bank.ranks, s, ps, 0,
                                                   save_h=False),
            "op": lambda: MIXED_LORA_LINEAR(x, W, None, bank.A, bank.B, index, s, ranks=bank.ranks, dropout_ps=ps),
            "peft_call": lambda: layer(x, adapter_names=names),
            "peft_loop": lambda: type(layer).forward(layer, x, adapter_names=names),
        }
        times = {k: [] for k in calls}
        order = list(calls)
        for f in calls.values():
            f()
        for i in range(rounds):
            random.Random(i).shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", default="1,16,64", help="comma-separated adapter counts")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms and ÷ frozen")
    for n in (int(v) for v in args.adapters.split(",")):
        med = profile(n, args.rounds)
        print(f"n={n:<3} " + "  ".join(f"{k} {v:.3f} ({v / med['frozen']:.3f})" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
