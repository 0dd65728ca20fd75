"""How often PEFT's own mixed-batch test fails on rounding alone, plain and accelerated (issue 23).

PEFT 0.21's ``TestMixedAdapterBatches::test_mixed_adapter_batches_partly_overlapping_target_layers`` builds a small
MLP (Linear 10→20, ReLU, Linear 20→2, LogSoftmax) with two adapters, feeds it ``arange(90)`` and compares a mixed
batch with single-adapter runs by ``torch.allclose`` at its default tolerance (rtol 1e-5, atol 1e-8). The
log-probabilities near 0 make that a test of the last bits: whether a row's products round the same in a 9-row
GEMM and in a 3-row one. Plain PEFT fails it for some random weights too. This script draws the weights from
``--seeds`` seeds and counts the failures of plain PEFT and of the same models accelerated by fastlora, so that a
failure of the accelerated suite can be told from a regression.

    python benchmarks/mixed_rounding.py --seeds 300
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn as nn


class MLP(nn.Module):  # PEFT's tests/test_custom_models.py MLP, as the test builds it
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.to(torch.float))))))


def fails(seed: int, accelerate: bool) -> bool:
    """PEFT's run_checks on one draw of the weights: True when one of its allclose checks fails."""
    from peft import LoraConfig, get_peft_model

    import fastlora

    torch.manual_seed(seed)
    model = get_peft_model(MLP().eval(), LoraConfig(target_modules=["lin0"], init_lora_weights=False), "adapter0")
    model.add_adapter("adapter1", LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.eval()
    if accelerate:
        model = fastlora.accelerate_peft(model)
    X = torch.arange(90).view(-1, 10)
    with model.disable_adapter():
        base = model(X=X)
    model.set_adapter("adapter0")
    out0 = model(X=X)
    model.set_adapter("adapter1")
    out1 = model(X=X)
    mixed = model(X=X, adapter_names=[["__base__", "adapter0", "adapter1"][i % 3] for i in range(9)])
    return not (torch.allclose(base[::3], mixed[::3]) and torch.allclose(out0[1::3], mixed[1::3])
                and torch.allclose(out1[2::3], mixed[2::3]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=300)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    for accelerate in (False, True):
        bad = [s for s in range(args.seeds) if fails(s, accelerate)]
        print(f"{'fastlora' if accelerate else 'plain PEFT':10} fails {len(bad)} of {args.seeds} draws: {bad}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
