"""Mutation check of the test suite: put one small, realistic bug into a COPY of the repository, run the tests
that should notice it, and report whether they did (caught) or not (survived).

    python tests/mutants.py                 # every mutant, one at a time, then the score
    python tests/mutants.py --list          # the mutants and the tests each runs
    python tests/mutants.py --only NAME[,NAME...]   # a few (names or name prefixes)
    python tests/mutants.py -j 2            # two mutants at a time (each in its own copy)

Each mutant is (file, exact original snippet, replacement, pytest selection). The snippet must occur exactly once
in the file (tests/test_mutants_apply.py checks that in CI, so the list cannot rot silently when the code moves).
The real files are never edited: every mutant gets a fresh temporary copy of the repository, with
``fastlora/kernels`` linked to the copy's ``kernels/`` so ``import fastlora.kernels`` resolves inside the copy,
not to the editable install. Before the mutants run, the unmutated copy must pass every selection (the baseline),
otherwise a "caught" would mean nothing. Exit status 0 when every mutant was caught.

Run it before landing a change to the kernels or the math: a mutant that survives is a bug the suite would miss.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple  # pytest node ids / files, relative to the repository root
    k: str | None = None  # optional pytest -k expression
    why: str = ""


LL = "kernels/lora_linear.py"
LK = "kernels/lora_kernels.py"
KC = "kernels/common.py"
DROP = "kernels/dropout.py"
REF = "fastlora/reference.py"
AG = "fastlora/autograd.py"
PEFT = "fastlora/peft_interop/__init__.py"
PEFT_LINEAR = "fastlora/peft_interop/linear.py"

PATHS = "tests/test_kernel_paths.py"
PHILOX = "tests/test_dropout_philox.py"
COMBOS = "tests/test_trainable_combinations.py"
KTESTS = "tests/test_kernels.py"
FUNC = "tests/test_functional.py"
PEFT_TESTS = "tests/test_peft_interop.py"
DROP_TORCH = "tests/test_dropout_torch.py"
BENCH = "tests/test_bench.py"
EDGES = "tests/test_op_edges.py"
MOE_TESTS = "tests/test_moe.py"
MOE_PEFT_TESTS = "tests/test_moe_peft.py"

MUTANTS = [
    # --- the five bugs issue 16 found surviving -------------------------------------------------------------
    Mutant("dA_mask_relative_row", LK,
           "keep = philox_keep(seed, drop_thr, offs_m, pid_k * BLOCK_K, BLOCK_M, BLOCK_K, N_ROUNDS)",
           "keep = philox_keep(seed, drop_thr, offs_m - m_start, pid_k * BLOCK_K, BLOCK_M, BLOCK_K, N_ROUNDS)",
           (f"{PATHS}::test_split_dA_with_dropout_at_large_M",),
           why="dA keys its mask by the row within its split: wrong whenever M > 256 with dropout"),
    Mutant("deterministic_dB_without_scaling", LL,
           "dB = torch.mm(grad_y.t().to(ld), h.to(ld)).mul_(scaling).to(lora_B.dtype)",
           "dB = torch.mm(grad_y.t().to(ld), h.to(ld)).to(lora_B.dtype)",
           (PATHS, f"{KTESTS}::test_deterministic_mode_reads_dy_without_atomics"), k="deterministic",
           why="deterministic mode's dB misses s"),
    Mutant("deterministic_mode_ignored", LL,
           "deterministic = torch.are_deterministic_algorithms_enabled()",
           "deterministic = False",
           (PATHS, f"{KTESTS}::test_deterministic_mode_reads_dy_without_atomics"), k="deterministic",
           why="atomics still used under torch.use_deterministic_algorithms"),
    Mutant("philox_word_reused_across_quad", DROP,
           "words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_ROWS, BLOCK_COLS))",
           "words = tl.reshape(tl.join(tl.join(w0, w0), tl.join(w0, w0)), (BLOCK_ROWS, BLOCK_COLS))",
           (PHILOX,), why="one 32-bit word for the four columns of a quad"),
    Mutant("autograd_A_B_needs_swapped", AG,
           "return reference.lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, *needs)",
           "return reference.lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, "
           "needs[0], needs[1], needs[3], needs[2], needs[4])",
           (COMBOS,), k="trainable_combination and torch",
           why="with A frozen, B never gets a gradient"),
    # --- dropout mask -----------------------------------------------------------------------------------------
    Mutant("philox_row_not_in_counter", DROP,
           "c1 = rows[:, None].to(tl.uint32) + zero",
           "c1 = zero",
           (PHILOX,), why="every row gets the same mask"),
    # the same two bugs against the statistics alone: independence checks that fail every time, not by chance
    Mutant("philox_word_reused_statistics_only", DROP,
           "words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_ROWS, BLOCK_COLS))",
           "words = tl.reshape(tl.join(tl.join(w0, w0), tl.join(w0, w0)), (BLOCK_ROWS, BLOCK_COLS))",
           (PHILOX,), k="independent", why="as above, caught by the neighbour statistics alone"),
    Mutant("philox_row_not_in_counter_statistics_only", DROP,
           "c1 = rows[:, None].to(tl.uint32) + zero",
           "c1 = zero",
           (PHILOX,), k="independent", why="as above, caught by the neighbour statistics alone"),
    Mutant("philox_column_tile_offset_lost", DROP,
           "quads = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)",
           "quads = tl.arange(0, BLOCK_COLS // 4)",
           (PHILOX,), why="every column tile repeats the first tile's mask"),
    Mutant("philox_threshold_exclusive", DROP,
           "return words >= thr.to(tl.uint32)",
           "return words > thr.to(tl.uint32)",
           (f"{PHILOX}::test_threshold_boundary_is_inclusive",), why="off-by-one at the threshold"),
    Mutant("philox_rounds_changed", DROP,
           "PHILOX_ROUNDS = 7",
           "PHILOX_ROUNDS = 6",
           (PHILOX,), why="fewer rounds than documented"),
    Mutant("dropout_threshold_scale", DROP,
           "return min(int(round(float(p) * 2.0**32)), 2**32 - 1)",
           "return min(int(round(float(p) * 2.0**31)), 2**32 - 1)",
           (PHILOX,), why="drops with probability p/2"),
    # --- kernels ----------------------------------------------------------------------------------------------
    Mutant("shrink_mask_ignores_k_tile", LK,
           "keep = philox_keep(seed, drop_thr, offs_m, k, BLOCK_M, BLOCK_K, N_ROUNDS)",
           "keep = philox_keep(seed, drop_thr, offs_m, 0, BLOCK_M, BLOCK_K, N_ROUNDS)",
           (PATHS,), k="even_k", why="the forward mask repeats every K tile"),
    Mutant("shrink_dropout_unscaled", LK,
           "keep = philox_keep(seed, drop_thr, offs_m, k, BLOCK_M, BLOCK_K, N_ROUNDS)\n"
           "            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(cdt)",
           "keep = philox_keep(seed, drop_thr, offs_m, k, BLOCK_M, BLOCK_K, N_ROUNDS)\n"
           "            x = tl.where(keep, x, 0.0)",
           (PATHS,), k="even_k", why="h misses 1/(1-p)"),
    Mutant("dx_epilogue_dropout_unscaled", LK,
           "acc = tl.where(keep, acc * inv_keep, 0.0)",
           "acc = tl.where(keep, acc, 0.0)",
           (PATHS,), k="even_k", why="dX's low-rank term misses 1/(1-p)"),
    Mutant("dx_epilogue_mask_wrong_tile", LK,
           "acc = low_rank_prologue(acc, l_ptr, u_ptr, rows, cols, offs_m, pid_n * BLOCK_N, R,",
           "acc = low_rank_prologue(acc, l_ptr, u_ptr, rows, cols, offs_m, pid_m * BLOCK_N, R,",
           (PATHS,), k="even_k", why="dX's mask keyed by the row tile instead of the column tile"),
    Mutant("bias_dropped_on_fused_small_M_path", LK,
           "    if HAS_BIAS:\n        acc += tl.load(bias_ptr + cols)",
           "    if HAS_BIAS and not FUSE_SHRINK:\n        acc += tl.load(bias_ptr + cols)",
           (PATHS,), k="fused_small_M", why="small-M forward without its bias"),
    Mutant("even_k_heuristic_too_loose", LL,
           'return args["K"] % args["BLOCK_K"] == 0',
           'return args["K"] % 16 == 0',
           (PATHS,), k="even_k", why="unmasked K loop when K is a multiple of 16 but not of BLOCK_K"),
    Mutant("dy_dh_without_scaling", LK,
           "tl.store(dh_ptrs, dh * scaling, mask=m_ok[:, None] & r_ok[None, :])",
           "tl.store(dh_ptrs, dh, mask=m_ok[:, None] & r_ok[None, :])",
           (PATHS,), k="fused_small_M", why="dh (hence dx, dA) misses s"),
    Mutant("dbias_added_per_rank_chunk", LK,
           "            if pid_r == 0:\n                tl.atomic_add(dbias_ptr",
           "            if True:\n                tl.atomic_add(dbias_ptr",
           (f"{PATHS}::test_rank_chunks_above_128",), why="dbias counted once per rank chunk (r > 128)"),
    Mutant("dA_first_split_only", LL,
           "return part[0] if splits == 1 else part.sum(0)",
           "return part[0]",
           (PATHS,), k="split_dA", why="dA keeps only the first row split"),
    Mutant("dA_splits_overlap", LK,
           "m_end = tl.minimum(m_start + rows_per_split, M)",
           "m_end = M",
           (PATHS,), k="split_dA", why="each split runs to the end: rows counted several times"),
    Mutant("fused_small_M_with_dropout", LL,
           "fusable = M <= FUSED_SHRINK_MAX_M and p == 0.0 and r <= FUSED_SHRINK_MAX_R and N > 0",
           "fusable = M <= FUSED_SHRINK_MAX_M and r <= FUSED_SHRINK_MAX_R and N > 0",
           (PATHS,), k="small_M", why="the fused shrink ignores dropout"),
    Mutant("fused_small_M_h_not_stored", LL,
           "_forward_gemm(x, weight, lora_A, lora_B, bias, y, h if h is not None else y, scaling, mb, True, True,\n"
           "                  h is not None)",
           "_forward_gemm(x, weight, lora_A, lora_B, bias, y, h if h is not None else y, scaling, mb, True, True,\n"
           "                  False)",
           (PATHS,), k="fused_small_M", why="training on the small-M path saves an unwritten h"),
    Mutant("cublas_forward_gemm_twice", LL,
           "M, N, K if k_loop else 0, r,",
           "M, N, K, r,",
           (PATHS,), k="cublas", why="the Triton GEMM and cuBLAS both add x@Wᵀ"),
    Mutant("cublas_forward_gemm_missing", LL,
           "    _forward_gemm(x, weight, lora_A, lora_B, bias, y, h, scaling, mb, False, False, False)\n    y.addmm_(x, weight.t())",
           "    _forward_gemm(x, weight, lora_A, lora_B, bias, y, h, scaling, mb, False, False, False)",
           (PATHS,), k="cublas", why="the cuBLAS composition forgets x@Wᵀ"),
    Mutant("cublas_dx_gemm_missing", LL,
           "\"cublas\": lambda: (_dx_gemm(*args, k_loop=False), dx.addmm_(grad_y, weight))}",
           "\"cublas\": lambda: (_dx_gemm(*args, k_loop=False), None)}",
           (PATHS,), k="cublas", why="the cuBLAS composition forgets dY@W"),
    Mutant("dy_fused_dB_without_scaling", LK,
           "h = h.to(tl.float32) * scaling\n",
           "h = h.to(tl.float32)\n",
           (COMBOS,), k="trainable_combination and triton", why="the dY pass's dB (atomics) misses s"),
    Mutant("fused_small_M_epilogue_without_scaling", LK,
           "return low_rank_dot(l_acc * scaling, u, acc, cdt, LO_FP32, DOT_PRECISION)",
           "return low_rank_dot(l_acc, u, acc, cdt, LO_FP32, DOT_PRECISION)",
           (PATHS,), k="fused_small_M", why="small-M forward misses s"),
    Mutant("dh_skipped_when_only_A_trains", LL,
           "need_dh = needs_input or needs_A",
           "need_dh = needs_input",
           (COMBOS,), k="trainable_combination and triton", why="dA with a frozen input has no dh"),
    Mutant("dropout_inverse_keep_wrong", DROP,
           "return dropout_threshold(p), 1.0 / (1.0 - p)",
           "return dropout_threshold(p), 1.0 - p",
           (PATHS,), k="even_k", why="kept elements multiplied by (1-p) instead of divided"),
    Mutant("gemm_group_swizzle_last_group", LK,
           "group_size_m = min(num_pid_m - first_pid_m, GROUP_M)",
           "group_size_m = GROUP_M",
           (PATHS,), k="even_k", why="the last, short group of row tiles maps programs to the wrong tiles"),
    Mutant("dB_accumulator_not_zeroed", LL,
           "db = torch.zeros((N, r), dtype=torch.float32, device=dev) if need_db else None",
           "db = torch.empty((N, r), dtype=torch.float32, device=dev) if need_db else None",
           (PATHS,), k="default_mode", why="atomics add into uninitialized memory (caught by the NaN poisoning)"),
    # --- reference math (the CPU fallback) ----------------------------------------------------------------------
    Mutant("reference_dA_dropout_unscaled", REF,
           "dA = torch.mm(dh.t(), _dropped(x, drop, ld)).mul_(inv_keep)",
           "dA = torch.mm(dh.t(), _dropped(x, drop, ld))",
           (COMBOS,), k="torch", why="fallback dA misses 1/(1-p)"),
    Mutant("reference_forward_dropout_unscaled", REF,
           "h = torch.mm(_dropped(x, drop, ld), (lora_A / (1.0 - dropout_p)).to(ld).t())",
           "h = torch.mm(_dropped(x, drop, ld), lora_A.to(ld).t())",
           (COMBOS,), k="torch", why="fallback forward misses 1/(1-p)"),
    Mutant("functional_dropout_in_eval", "fastlora/op_common.py",
           "a[self.dropout] = float(p) if training else 0.0",
           "a[self.dropout] = float(p)",
           (f"{FUNC}::test_dropout_only_in_training_and_new_mask_each_call",), why="dropout applied with training=False"),
    Mutant("reference_mask_keeps_with_probability_p", REF,
           "log_keep = math.log1p(-p)",
           "log_keep = math.log(p)",
           (f"{FUNC}::test_dropout_matches_oracle_with_the_regenerated_mask",),
           why="the fallback keeps with probability p instead of 1-p"),
    Mutant("reference_mask_gap_off_by_one", REF,
           "gaps = u.neg_().log1p_().div_(log_keep).to(torch.int64).add_(1)",
           "gaps = u.neg_().log1p_().div_(log_keep).ceil_().to(torch.int64).add_(1)",
           (DROP_TORCH,), why="geometric gaps one too long: drops with probability ~p/(1+p)"),
    Mutant("reference_mask_next_chunk_restarts", REF,
           "pos = gaps.cumsum_(0).add_(last)",
           "pos = gaps.cumsum_(0).add_(-1)",
           (DROP_TORCH,), why="a second chunk of gaps restarts at the first element instead of the last drop"),
    Mutant("reference_mask_ignores_the_seed", REF,
           "gen.manual_seed(int(seed))",
           "gen.manual_seed(0)",
           (DROP_TORCH,), why="every call draws the same mask"),
    Mutant("reference_dropped_copy_writes_into_x", REF,
           "return _dropped_(t.clone(memory_format=torch.contiguous_format), drop)",
           "return _dropped_(t.contiguous(), drop)",
           (DROP_TORCH,), why="the masked copy of x zeroes the caller's x (and the saved input) in place"),
    Mutant("reference_dB_without_scaling", REF,
           "dB = torch.mm(h.to(ld).t(), dy).mul_(scaling).t().to(lora_B.dtype)",
           "dB = torch.mm(h.to(ld).t(), dy).t().to(lora_B.dtype)",
           (COMBOS,), k="torch", why="fallback dB misses s"),
    Mutant("reference_forward_without_scaling", REF,
           "hs = h * scaling\n",
           "hs = h\n",
           (COMBOS,), k="torch", why="fallback forward misses s"),
    Mutant("reference_dx_mask_dropped", REF,
           "dx = _dropped_(torch.mm(dh, (lora_A * inv_keep).to(cd)), drop).addmm_(grad_y, weight)",
           "dx = torch.mm(dh, (lora_A * inv_keep).to(cd)).addmm_(grad_y, weight)",
           (COMBOS,), k="torch", why="fallback dx uses the dropped elements"),
    Mutant("reference_bias_dropped", REF,
           "y = torch.addmm(bias, x, weight.t())",
           "y = torch.mm(x, weight.t())",
           (COMBOS,), k="autocast or half_base", why="fallback forward without bias"),
    Mutant("reference_bias_dropped_layer_autocast", REF,
           "y = torch.addmm(bias, x, weight.t())",
           "y = torch.mm(x, weight.t())",
           ("tests/test_compile_dist.py",), k="autocast",
           why="as above, against the LoRALinear autocast test (its bias was once within 1.06x of the tolerance)"),
    Mutant("reference_bias_dropped_functional_low_precision", REF,
           "y = torch.addmm(bias, x, weight.t())",
           "y = torch.mm(x, weight.t())",
           (FUNC,), k="bf16_base or autocast_cpu", why="as above, against the functional bf16 / autocast tests"),
    Mutant("reference_backward_mask_other_seed", REF,
           "if dropout_p > 0.0 and (needs_input or needs_A):\n        drop = dropout_drop_index(seed, x.numel()",
           "if dropout_p > 0.0 and (needs_input or needs_A):\n        drop = dropout_drop_index(seed + 1, x.numel()",
           (COMBOS,), k="torch", why="the backward regenerates a different mask"),
    # --- autograd ---------------------------------------------------------------------------------------------
    Mutant("autograd_new_seed_in_backward", "fastlora/op_common.py",
           "grads = op.backward(grad_y, tensors, saved, ctx.consts, ctx.seed, ctx.use_triton, needs)",
           "grads = op.backward(grad_y, tensors, saved, ctx.consts, draw_seed(op.dropout_p(ctx.consts)), "
           "ctx.use_triton, needs)",
           (COMBOS,), k="trainable_combination", why="eager backward draws a fresh mask"),
    Mutant("autograd_backward_scaling_one", AG,
           "return reference.lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, *needs)",
           "return reference.lora_backward(grad_y, x, weight, lora_A, lora_B, h, 1.0, dropout_p, seed, *needs)",
           (COMBOS,), k="trainable_combination and torch", why="eager backward with s = 1"),
    Mutant("autograd_frozen_bias_grad_computed", "fastlora/op_common.py",
           "return [bool(n) and t is not None and name not in self.no_grad",
           "return [(bool(n) or name == \"bias\") and t is not None and name not in self.no_grad",
           (f"{FUNC}::test_weight_gradient_only_when_asked",), why="dbias computed for a frozen bias"),
    Mutant("compiled_path_bias_grad_dropped", "fastlora/op_common.py",
           "needs = op.needs(ctx.needs_input_grad[:n_t], tensors)",
           "needs = op.needs(ctx.needs_input_grad[:n_t - 1], tensors)",
           ("tests/test_compile_dist.py",), k="compile_fullgraph_equals_eager and cpu-auto",
           why="under torch.compile a trainable bias gets no gradient"),
    Mutant("autograd_constant_seed", "fastlora/op_common.py",
           "return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))",
           "return 12345",
           (f"{FUNC}::test_dropout_only_in_training_and_new_mask_each_call",),
           why="every call draws the same dropout mask"),
    Mutant("layer_dropout_in_eval", "fastlora/layers.py",
           "return lora_linear(input, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,\n"
           "                           dropout_p=self.lora_dropout, training=self.training)",
           "return lora_linear(input, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,\n"
           "                           dropout_p=self.lora_dropout, training=True)",
           ("tests/test_layers.py::test_eval_disables_dropout",), why="LoRALinear drops in eval mode"),
    # --- the PEFT router and its linear fuser --------------------------------------------------------------------
    Mutant("peft_router_ignores_scaling", PEFT_LINEAR,
           "ss.append(layer.scaling[a])",
           "ss.append(1.0)",
           (f"{PEFT_TESTS}::test_outputs_and_every_gradient_equal_peft",), why="PEFT's lora_alpha/r ignored"),
    Mutant("peft_router_ignores_dropout", "fastlora/peft_interop/registry.py",
           "return float(dropout.p)",
           "return 0.0",
           (f"{PEFT_TESTS}::test_dropout_uses_each_adapters_p_and_its_own_mask",), why="PEFT's lora_dropout ignored"),
    Mutant("peft_router_dropout_in_eval", "fastlora/peft_interop/registry.py",
           "return p if p is None or dropout.training else 0.0",
           "return p",
           (f"{PEFT_TESTS}::test_dropout_uses_each_adapters_p_and_its_own_mask",), why="dropout stays on in eval"),
    Mutant("peft_router_fuses_disabled_adapters", PEFT,
           "if layer.disable_adapters:\n        return _DISABLED",
           "if False:\n        return _DISABLED",
           ("tests/test_peft_features.py::test_adapter_management_follows_peft_and_later_adapters_are_fused",),
           why="disable_adapter() still adds the LoRA term"),
    Mutant("peft_router_fuses_merged_adapters", PEFT,
           "if layer.merged:\n        return _MERGED",
           "if False:\n        return _MERGED",
           ("tests/test_peft_features.py::test_adapter_management_follows_peft_and_later_adapters_are_fused",),
           why="a merged adapter is added twice"),
    Mutant("peft_router_fuses_first_of_several_adapters", PEFT_LINEAR,
           "for a in adapters:\n        dropout = layer.lora_dropout[a]",
           "for a in adapters[:1]:\n        dropout = layer.lora_dropout[a]",
           ("tests/test_peft_router_values.py::test_two_active_adapters_after_acceleration",),
           why="with two active adapters only the first is applied"),
    Mutant("peft_router_drops_base_bias", PEFT_LINEAR,
           "bias = base.bias\n    for a in adapters:",
           "bias = None\n    for a in adapters:",
           (f"{PEFT_TESTS}::test_outputs_and_every_gradient_equal_peft",), why="the base layer's bias is lost"),
    # --- DoRA ------------------------------------------------------------------------------------------------------
    Mutant("dora_norm_cross_term_sign", "fastlora/dora.py",
           "(row_sq + (2.0 * scaling) * cross",
           "(row_sq - (2.0 * scaling) * cross",
           ("tests/test_dora.py::test_norm_from_small_products",), why="‖W + sBA‖ with the cross term's sign flipped"),
    Mutant("dora_magnitude_grad_not_divided", "fastlora/dora.py",
           "dm = (grad_y.to(g.dtype) * z.to(g.dtype)).sum(0).div_(norm)",
           "dm = (grad_y.to(g.dtype) * z.to(g.dtype)).sum(0)",
           ("tests/test_dora.py::test_linear_equals_peft_torch",), why="the magnitude's gradient misses 1/‖·‖"),
    Mutant("dora_dx_drops_base_dropout_term", "fastlora/dora.py",
           "dx = torch.where(keep, dx_d * c + dyw * (1.0 - c), dyw).to(cd)",
           "dx = torch.where(keep, dx_d * c, dyw).to(cd)",
           ("tests/test_dora.py::test_linear_equals_peft_torch",), why="dx loses the (1 − c)·dY W term of dropout"),
    Mutant("dora_second_base_gemm_dropped", "fastlora/dora.py",
           "z = torch.mm(x_d, weight.t())  # PEFT's second base GEMM",
           "z = torch.mm(x, weight.t())  # PEFT's second base GEMM",
           ("tests/test_dora.py::test_linear_equals_peft_torch",), why="with dropout, the undropped base GEMM is lost"),
    # --- issue 20: results that were silently wrong -------------------------------------------------------------
    Mutant("reference_scaling_as_addmm_alpha", REF,
           "hs = h * scaling\n    if ld == cd:\n        y.addmm_(hs, lora_B.to(cd).t())",
           "hs = h\n    if ld == cd:\n        y.addmm_(hs, lora_B.to(cd).t(), alpha=scaling)",
           (EDGES,), k="nan_in_an_adapter and torch and lora", why="scaling 0 (addmm's alpha) hides a NaN in A or B"),
    Mutant("dispatch_keeps_the_slower", "kernels/dispatch.py",
           "choice = min(times, key=times.get)",
           "choice = max(times, key=times.get)",
           ("tests/test_kernels_dispatch.py", "tests/test_qlora.py"), k="measured or faster or dispatch",
           why="the measured-choice dispatcher keeps the slower composition"),
    Mutant("dispatch_cache_ignored", "kernels/dispatch.py",
           "if key in self.choices:",
           "if False:",
           ("tests/test_qlora.py",), k="measured", why="every call times every candidate again"),
    Mutant("dora_embedding_dm_without_norm", "fastlora/dora.py",
           "dm = (dy * (base_output.to(ld) + lora)).sum(0) / norm.to(ld)",
           "dm = (dy * (base_output.to(ld) + lora)).sum(0)",
           ("tests/test_dora.py", "tests/test_ops_protocol.py"), k="embedding",
           why="the DoRA embedding's magnitude gradient misses 1/‖W + sBA‖"),
    Mutant("dora_embedding_padding_row_gets_grad", "fastlora/dora.py",
           "pad = -1 if padding_idx is None else (padding_idx + V if padding_idx < 0 else padding_idx)",
           "pad = -1",
           ("tests/test_dora.py", "tests/test_ops_protocol.py"), k="embedding",
           why="lora_A's padding row gets a gradient, which PEFT's lookup never gives it"),
    Mutant("lora_embedding_padding_row_gets_grad", "fastlora/embedding.py",
           "return padding_idx + num_embeddings if padding_idx < 0 else padding_idx",
           "return -1",
           ("tests/test_lora_embedding.py", "tests/test_ops_protocol.py"), k="embedding",
           why="lora_A's padding row gets a gradient, which PEFT's lookup never gives it"),
    Mutant("qlora_scaling_as_addmm_alpha", "fastlora/qlora.py",
           "hs = h.to(ld) * scaling  # s on the (M, r) side: alpha = 0 would hide a NaN in A or B\n"
           "        if ld == cd:\n            y.addmm_(hs, lora_B.to(cd).t())",
           "hs = h.to(ld)\n        if ld == cd:\n            y.addmm_(hs, lora_B.to(cd).t(), alpha=scaling)",
           (EDGES,), k="nan_in_an_adapter and torch and 4bit", why="the 4-bit op hides a NaN at scaling 0"),
    Mutant("reference_forward_low_rank_in_fp16", REF,
           "ld = low_rank_dtype(cd, lora_A.dtype)\n    if dropout_p == 0.0:",
           "ld = cd\n    if dropout_p == 0.0:",
           (EDGES,), k="fp16_base and torch and lora", why="fp32 adapters' h and s·h Bᵀ computed in fp16: overflow"),
    Mutant("reference_backward_low_rank_in_fp16", REF,
           "ld = low_rank_dtype(cd, lora_A.dtype)\n    inv_keep",
           "ld = cd\n    inv_keep",
           (EDGES,), k="fp16_base and torch and lora", why="dh, dA, dB of fp32 adapters computed in fp16: inf"),
    Mutant("kernels_low_rank_in_fp16", KC,
           "return dtype == torch.float16 and adapter_dtype == torch.float32",
           "return False",
           (EDGES,), k="fp16_base and triton and lora", why="the kernels' rank-r products in fp16: inf where PEFT is finite"),
    Mutant("kernel_dy_dB_operand_in_fp16", LK,
           "part = tl.dot(tl.trans(dy).to(tl.float32), h,",
           "part = tl.dot(tl.trans(dy).to(tl.float32), h.to(cdt).to(tl.float32),",
           (EDGES,), k="fp16_base and triton and lora", why="s·h rounded to fp16 in the dY pass: dB inf"),
    Mutant("kernel_dA_operand_in_fp16", LK,
           "acc = tl.dot(tl.trans(dh.to(tl.float32)), x.to(tl.float32), acc, input_precision=\"tf32\")",
           "acc = tl.dot(tl.trans(dh.to(cdt)).to(tl.float32), x.to(tl.float32), acc, input_precision=\"tf32\")",
           (EDGES,), k="fp16_base and triton and lora", why="dh rounded to fp16 in dA: inf"),
    Mutant("double_backward_differentiates_nothing", "fastlora/op_common.py",
           "if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiated again\n",
           "if False:\n",
           (EDGES,), k="double_backward and lora", why="a gradient penalty through lora_linear treated as a constant"),
    Mutant("dora_double_backward_differentiates_nothing", "fastlora/dora.py",
           "norm = saved[2]\n",
           "norm = saved[3]\n",
           (EDGES,), k="double_backward and dora", why="DoRA's double backward differentiates with g for the norm"),
    Mutant("bf16_sent_to_the_interpreter", "fastlora/backend.py",
           "if dtype == torch.bfloat16 and device.type == \"cpu\" and triton_interpreted():",
           "if False:",
           (EDGES,), k="bf16", why="bf16 runs on Triton's interpreter (garbage)"),
    Mutant("non_finite_scaling_accepted", "fastlora/op_common.py",
           "if not math.isfinite(float(scaling)):",
           "if False:",
           (EDGES,), k="non_finite", why="a NaN / inf scaling is taken"),
    Mutant("tensor_scaling_dropped_when_folded", "fastlora/op_common.py",
           "return lora_B * scaling.reshape(()).to(lora_B.dtype), 1.0",
           "return lora_B, 1.0",
           (EDGES,), k="tensor_scaling and dora", why="a tensor scaling of DoRA / 4-bit is lost"),
    Mutant("meta_device_asks_autocast", "fastlora/op_common.py",
           "return device_type != \"meta\" and torch.is_autocast_enabled(device_type)",
           "return torch.is_autocast_enabled(device_type)",
           (EDGES,), k="meta_device", why="meta tensors fail in autocast's device check"),
    Mutant("k_zero_flattened_ambiguously", "fastlora/op_common.py",
           "return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])",
           "return input.reshape(-1, input.shape[-1])",
           (EDGES,), k="no_input_features", why="K = 0 with 3-D input: reshape(-1, 0)"),
    Mutant("interpreter_launches_not_serialized", "fastlora/backend.py",
           "if use_triton and triton_interpreted():\n        return _INTERPRETER_LOCK",
           "if False:\n        return _INTERPRETER_LOCK",
           (EDGES,), k="thread_safe", why="two threads in Triton's interpreter corrupt each other's launches"),
    Mutant("autotuned_launches_not_serialized", LL,
           "with _AUTOTUNE_LOCK:\n            tuned[grid](*args, **kwargs)",
           "if True:\n            tuned[grid](*args, **kwargs)",
           (EDGES,), k="autotuned", why="first calls from two threads race in the autotuner's reset_to_zero"),
    Mutant("embedding_adapter_dtypes_unchecked", "fastlora/op_common.py",
           "if a[\"lora_A\"].dtype != a[\"lora_B\"].dtype:\n            raise TypeError(f\"{self.name}:",
           "if False:\n            raise TypeError(f\"{self.name}:",
           (EDGES,), k="lora_embedding_checks", why="torch's raw error instead of one naming the dtypes"),
    Mutant("multi_adapter_dtypes_unchecked", "fastlora/functional.py",
           "LORA_LINEAR.validate(input, weight, A, B, bias, scaling=s, dropout_p=p)  # as lora_linear checks each",
           "pass",
           (EDGES,), k="multi_checks", why="lora_linear_multi casts what lora_linear refuses"),
    Mutant("dora_norm_reused_in_training", "fastlora/dora.py",
           "if not (reuse and _can_reuse(weight)):",
           "if not _can_reuse(weight):",
           ("tests/test_dora.py::test_norm_is_reused_only_while_provably_unchanged",),
           why="training calls look the norm up (a copy and a compare per call, and a host sync on CUDA)"),
    Mutant("dora_norm_cache_ignores_values", "fastlora/dora.py",
           "and _same_values(hit[3], lora_A) and _same_values(hit[4], lora_B)):",
           "and hit[3].shape == lora_A.shape):",
           ("tests/test_dora_training.py",), k="data_writes and torch", why="a .data write to A or B goes unseen"),
    Mutant("dora_norm_cache_ignores_storage", "fastlora/dora.py",
           "hit[1]() is storage and ",
           "",
           ("tests/test_dora.py::test_norm_is_reused_only_while_provably_unchanged",),
           why="a new storage for W (.data =) at the same version goes unseen"),
    Mutant("merge_keeps_the_dora_norm", PEFT,
           "                clear_norm_cache(weight)\n",
           "                pass\n",
           ("tests/test_peft_edges.py::test_merge_and_unmerge_clear_the_dora_norm",),
           why="PEFT's merge / unmerge write W in place; the kept norm stays"),
    Mutant("nested_tuner_layer_fused", "fastlora/peft_interop/registry.py",
           "if base is not None and \"base_layer\" in base._modules:",
           "if False:",
           ("tests/test_peft_edges.py",), k="nested", why="a LoRA layer over a LoHa layer skips the LoHa forward"),
    Mutant("dropout_one_fused", "fastlora/peft_interop/registry.py",
           "if p >= 1.0 and dropout.training:",
           "if False:",
           ("tests/test_peft_edges.py::test_lora_dropout_one_runs_as_peft",),
           why="lora_dropout=1.0 called fused, then the op raises"),
    Mutant("dora_base_not_nn_linear_product", "fastlora/dora.py",
           "base = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())",
           "base = torch.mm(x, weight.t()) if bias is None else torch.mm(x, weight.t()).add_(bias)",
           ("tests/test_peft_edges.py::test_dora_at_initialization_is_a_no_op",),
           why="DoRA at initialization is no longer the base layer's output bit for bit"),
    Mutant("fuzzer_lora_bias_unscaled", PEFT_LINEAR,
           "extra = _scaled(b, layer.scaling[a]).to(weight.dtype)",
           "extra = b.to(weight.dtype)",
           ("tests/test_fuzz_peft.py",), why="the differential fuzzer's CI budget sees lora_bias without its scaling"),
    # --- QLoRA (4-bit bases) ------------------------------------------------------------------------------------
    Mutant("qlora_nibble_order_torch", "fastlora/qlora.py",
           "nib = torch.stack((q >> 4, q & 0xF), dim=1)",
           "nib = torch.stack((q & 0xF, q >> 4), dim=1)",
           ("tests/test_qlora.py::test_nibble_order_and_flat_blocks",), why="element 2i read from the low nibble"),
    Mutant("qlora_nibble_order_kernel", "kernels/qlora.py",
           "shift = (1 - (idx & 1).to(tl.int32)) * 4",
           "shift = (idx & 1).to(tl.int32) * 4",
           ("tests/test_qlora.py::test_nibble_order_and_flat_blocks",), why="the kernel reads nibbles swapped"),
    Mutant("qlora_kernel_scale_block_off_by_one", "kernels/qlora.py",
           "scale = tl.load(absmax_ptr + scale_idx // BLOCKSIZE, mask=ok, other=0.0)",
           "scale = tl.load(absmax_ptr + scale_idx // (2 * BLOCKSIZE), mask=ok, other=0.0)",
           ("tests/test_qlora.py::test_matches_bitsandbytes_dequantize_then_reference",),
           why="per-element / per-row scales read from the wrong block"),
    # --- the benchmark engine and the user-facing checks ----------------------------------------------------------
    Mutant("bench_allocator_left_adaptive", "fastlora/bench/timing.py",
           "_allocator = _set_malloc_thresholds()",
           '_allocator = "left adaptive"',
           (f"{BENCH}::test_steady_allocator_sets_glibcs_thresholds_once",),
           why="glibc's thresholds left adaptive: early cases page-fault every step, ratios depend on case order"),
    Mutant("bench_contended_rounds_kept", "fastlora/bench/timing.py",
           "busy_round |= waited is not None and waited > CONTENDED_WAIT",
           "busy_round |= False",
           (f"{BENCH}::test_rounds_that_waited_for_a_cpu_are_dropped_and_a_busy_case_is_marked",),
           why="rounds slowed by other processes are kept as if clean"),
    Mutant("bench_corunner_ignored", "fastlora/bench/timing.py",
           "if others and others > SHARED_CORES",
           "if others and others > 1e9",
           (f"{BENCH}::test_rounds_that_waited_for_a_cpu_are_dropped_and_a_busy_case_is_marked",),
           why="another process on the other core (--threads 1) shares caches and bandwidth unflagged"),
    Mutant("bench_bimodal_never", "fastlora/bench/timing.py",
           "return widest > gap * statistics.median(s)",
           "return False",
           (f"{BENCH}::test_bimodal_timings_are_told_from_a_long_tail",), why="two-mode timings pass as clean"),
    Mutant("bench_interval_unpaired", "fastlora/bench/timing.py",
           "        ib = ia\n",
           "        ib = torch.randint(n, (resamples, n), generator=gen)\n",
           (f"{BENCH}::test_ratio_interval_pairs_rounds_and_widens_with_noise",),
           why="interleaved rounds resampled apart: the shared drift counted as noise"),
    Mutant("bench_cpu_interval_without_floor", "fastlora/bench/run.py",
           "floor_sd=CPU_RATIO_SD if host else 0.0",
           "floor_sd=0.0",
           (f"{BENCH}::test_cpu_ratios_come_with_an_interval_no_narrower_than_runs_reproduce",),
           why="CPU ratios reported tighter than separate runs reproduce them"),
    Mutant("bench_goal_band_ignored", "fastlora/bench/summary.py",
           "verdict = goal_verdict(kind, threshold, value, band)",
           "verdict = goal_verdict(kind, threshold, value, (value, value))",
           (f"{BENCH}::test_goals_decide_the_exit_code_and_name_what_they_count",),
           why="a goal decided on the point value, whatever the noise"),
    Mutant("bench_goal_counts_every_dropout", "fastlora/bench/summary.py",
           "counted = [c for k, c in valid.items() if rates is None or k[DROPOUT] in rates]",
           "counted = list(valid.values())",
           (f"{BENCH}::test_goals_decide_the_exit_code_and_name_what_they_count",
            f"{BENCH}::test_cpu_fallback_goals_use_dropout_zero_cases_only"),
           why="cpu-fallback's goals count the dropout-0.1 cases too"),
    Mutant("bench_missed_goal_exits_zero", "fastlora/bench/cli.py",
           '"missed": EXIT_GOAL_MISSED',
           '"missed": EXIT_OK',
           (f"{BENCH}::test_goals_decide_the_exit_code_and_name_what_they_count",),
           why="--goals cannot gate CI: a missed goal exits 0"),
    Mutant("bench_plot_no_noisy_rings", "fastlora/bench/plot.py",
           "if c[\"noisy\"]:  # the table's",
           "if False:  # the table's",
           (f"{BENCH}::test_plot_rings_every_point_the_table_flags_as_noisy",),
           why="the PNG does not mark what the table flags"),
    Mutant("bench_header_wrapped_mid_field", "fastlora/bench/report.py",
           "parts = [wrap_fields(header_fields(meta))]",
           'parts = [_wrap("; ".join(header_fields(meta)))]',
           (f"{BENCH}::test_header_breaks_between_fields_only",), why="the header breaks inside a field"),
    Mutant("bench_times_lose_trailing_zeros", "fastlora/bench/report.py",
           'return f"{value:.1f}"',
           'return f"{value:.3g}"',
           (f"{BENCH}::test_times_keep_their_decimals",), why="16.0 printed as 16 beside 14.4"),
    Mutant("set_backend_triton_unchecked", "fastlora/backend.py",
           'if name == "triton":\n        reason = triton_unusable()',
           'if False:\n        reason = triton_unusable()',
           (f"{FUNC}::test_triton_backend_is_refused_where_it_cannot_run",),
           why="set_backend('triton') accepted where the kernels cannot run; the error comes at the first forward"),
    Mutant("from_linear_embedding_no_hint", "fastlora/layers.py",
           "if isinstance(linear, nn.Embedding):",
           "if False:",
           ("tests/test_lora_embedding.py::test_wrapping_the_wrong_layer_names_the_right_class",),
           why="from_linear(nn.Embedding) does not point to LoRAEmbedding"),
    # --- MoE experts (issue 22): the grouped op, its kernels, PEFT's layout and the experts fuser ---------------
    Mutant("moe_ref_branch_unscaled", "fastlora/moe_reference.py",
           "ys.addmm_(hs, B_t[e], alpha=scaling)",
           "ys.addmm_(hs, B_t[e], alpha=1.0)",
           (MOE_TESTS,), k="torch and merged_weight", why="the CPU path forgets s in the forward"),
    Mutant("moe_ref_one_token_expert_skipped", "fastlora/moe_reference.py",
           "if end > start:\n            yield e, start, end",
           "if end > start + 1:\n            yield e, start, end",
           (MOE_TESTS,), k="torch and merged_weight", why="an expert with one token is skipped"),
    Mutant("moe_ref_dx_without_lora_term", "fastlora/moe_reference.py",
           "dxs.addmm_(dh[a:b], A[e], alpha=scaling)",
           "dxs.addmm_(dh[a:b], A[e], alpha=0.0)",
           (MOE_TESTS,), k="torch and merged_weight", why="dx misses s·dh A"),
    Mutant("moe_ref_grouped_shrink_wrong_expert", "fastlora/moe_reference.py",
           "return torch.nn.functional.grouped_mm(x, w, offs=offsets.to(torch.int32))",
           "return torch.nn.functional.grouped_mm(x, w.flip(0), offs=offsets.to(torch.int32))",
           (MOE_TESTS,), k="torch and merged_weight", why="h and dh through grouped_mm use another expert's factors"),
    Mutant("moe_ref_grouped_rank_grad_unscaled", "fastlora/moe_reference.py",
           "out.copy_(torch.nn.functional.grouped_mm(p.t(), q, offs=offsets.to(torch.int32)).mul_(scaling))",
           "out.copy_(torch.nn.functional.grouped_mm(p.t(), q, offs=offsets.to(torch.int32)))",
           (MOE_TESTS,), k="torch and merged_weight", why="dA / dB through grouped_mm miss s (aligned shapes)"),
    Mutant("moe_peft_B_expert_major", "fastlora/moe.py",
           "B = lora_B_weight.view(N, r, num_experts).permute(2, 0, 1)",
           "B = lora_B_weight.view(N, num_experts, r).permute(1, 0, 2)",
           (MOE_PEFT_TESTS,), k="logits_and_every_gradient and qwen3 and both",
           why="PEFT's lora_B read expert-major: its columns are expert-minor"),
    Mutant("moe_routing_weights_unsorted", "fastlora/moe.py",
           "out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(out.dtype)",
           "out = out * top_k_weights.reshape(-1).unsqueeze(-1).to(out.dtype)",
           (MOE_PEFT_TESTS,), k="logits_and_every_gradient and mixtral and both",
           why="routing weights applied in token order to rows sorted by expert"),
    Mutant("moe_fuser_drops_inner_wrapper", "fastlora/peft_interop/moe.py",
           "return [a for a in w.active_adapters if a in w._modules[\"lora_A\"]._modules]",
           "return []",
           (MOE_PEFT_TESTS,), k="logits_and_every_gradient and gpt_oss and both",
           why="the nested (inner) ParamWrapper's LoRA is left out of the fused computation"),
    Mutant("moe_kernel_tile_expert_off_by_one", "kernels/moe.py",
           "e = tl.sum((tile_end <= t).to(tl.int32), 0)",
           "e = tl.sum((tile_end < t).to(tl.int32), 0)",
           (MOE_TESTS,), k="triton and merged_weight", why="row tiles read the previous expert's weights"),
    Mutant("moe_kernel_fused_branch_unscaled", "kernels/moe.py",
           "acc = tl.dot(h * scaling, bt.to(tl.float32), acc, input_precision=DOT_PRECISION)",
           "acc = tl.dot(h, bt.to(tl.float32), acc, input_precision=DOT_PRECISION)",
           (MOE_TESTS,), k="triton and merged_weight", why="the fused GEMM's epilogue forgets s"),
    Mutant("moe_kernel_rank_chunk_offset", "kernels/moe.py",
           "rr = pid_r * R_BLOCK + tl.arange(0, R_BLOCK)",
           "rr = tl.arange(0, R_BLOCK)",
           (MOE_TESTS,), k="triton and above_one_chunk", why="every rank chunk of the shrink computes the first"),
    Mutant("moe_kernel_epilogue_chunk_offset", "kernels/moe.py",
           "rc = r0 + rr",
           "rc = rr",
           (MOE_TESTS,), k="triton and above_one_chunk", why="the epilogue reads the first rank chunk each time"),
    Mutant("moe_kernel_outer_start", "kernels/moe.py",
           "start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)",
           "start = tl.load(offs_ptr + e - 1, mask=e > 1, other=0).to(tl.int32)",
           (MOE_TESTS,), k="triton and merged_weight", why="expert 1's gradients sum expert 0's rows too"),
    Mutant("moe_kernel_tail_not_zeroed", "kernels/moe.py",
           "mask=(rt < S)[:, None] & (rz < N)[None, :])",
           "mask=(rt < last)[:, None] & (rz < N)[None, :])",
           (MOE_TESTS,), k="triton and past_the_last_offset", why="rows no expert owns stay uninitialized"),
    Mutant("moe_kernel_epilogue_overwrites_base", "kernels/moe.py",
           "acc += tl.load(y_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)",
           "acc += 0.0",
           (MOE_TESTS,), k="grouped_mm_composition", why="the grouped_mm composition loses the base GEMM"),
    Mutant("moe_kernel_rank0_bias_grad", "kernels/moe.py",
           "elif need_bias:  # the column sums alone",
           "elif False:  # the column sums alone",
           (MOE_TESTS,), k="triton and rank_zero", why="a projection without LoRA gets a zero bias gradient"),
]

# --- torch.compile's disk caches keyed on the ops' schemas --------------------------------------------------------
MUTANTS += [
    Mutant("compile_caches_not_tagged", "fastlora/__init__.py",
           "_tag_compile_caches()  # every op is registered by now",
           "pass  # every op is registered by now",
           ("tests/test_ops_protocol.py",), k="compile_caches",
           why="a graph compiled by another fastlora version is reused with the old op schemas"),
    Mutant("compile_caches_tag_ignores_schemas", "fastlora/op_common.py",
           'digest = hashlib.sha256("\\n".join(_SCHEMAS).encode())',
           'digest = hashlib.sha256(b"")',
           ("tests/test_ops_protocol.py",), k="compile_caches",
           why="the tag stays the same when a schema changes"),
]

# --- issue 23: mixed-adapter batches ----------------------------------------------------------------------------
MIXED_REF = "fastlora/mixed_reference.py"
MIXED_K = "kernels/mixed.py"
MIXED_PEFT = "fastlora/peft_interop/mixed.py"
MIXED_TESTS = "tests/test_mixed.py"
MIXED_PEFT_TESTS = "tests/test_mixed_peft.py"
MUTANTS += [
    Mutant("mixed_ref_one_scaling_for_all", MIXED_REF,
           "hs = h.mul_(s[cls.tile_adapter][:, None, None])",
           "hs = h.mul_(s[0])",
           (MIXED_TESTS,), k="torch_implementation", why="every adapter's rows take adapter 0's scaling"),
    Mutant("mixed_ref_dB_unscaled", MIXED_REF,
           "dBt = torch.bmm(dyt.transpose(1, 2), ht).mul_(st)",
           "dBt = torch.bmm(dyt.transpose(1, 2), ht)",
           (MIXED_TESTS,), k="torch_implementation", why="dB misses s_a"),
    Mutant("mixed_ref_padding_not_zeroed", MIXED_REF,
           "return t if cls.valid is None else t.masked_fill(~cls.valid[..., None], 0.0)",
           "return t",
           (MIXED_TESTS,), k="torch_implementation and skewed",
           why="padding slots of skewed groups (a copy of the tile's first row) add into dA and dB"),
    Mutant("mixed_ref_one_dropout_rate", MIXED_REF,
           "    return table[index + 1]\n",
           "    return table.max().expand(index.shape)\n",
           (f"{MIXED_TESTS}::test_each_adapter_draws_its_own_dropout_mask",),
           why="every row drops at the largest adapter's rate"),
    Mutant("mixed_ref_in_place_block_unscaled", MIXED_REF,
           "y[blk].view(n_t, T, N).baddbmm_(hs, Bt)",
           "y[blk].view(n_t, T, N).baddbmm_(hs / s[cls.tile_adapter][:, None, None], Bt)",
           (MIXED_TESTS,), k="torch_implementation and grouped", why="rows grouped by adapter: the scaling is lost"),
    Mutant("mixed_ref_sorted_rows_left_sorted", MIXED_REF,
           "        y = y.index_select(0, plan.inverse)\n",
           "        pass\n",
           (MIXED_TESTS,), k="torch_implementation and primes", why="the forward in sorted order is not unsorted"),
    Mutant("mixed_kernel_segment_off_by_one", MIXED_K,
           "s = tl.sum((cum <= t).to(tl.int32)) - 1",
           "s = tl.sum((cum < t).to(tl.int32)) - 1",
           (MIXED_TESTS,), k="triton_kernels_match and segments", why="tiles assigned to the previous segment"),
    Mutant("mixed_kernel_mask_by_sorted_position", MIXED_K,
           "keep = philox_keep(seed, thr, rows, k, TILE_M, BLOCK_K, N_ROUNDS)",
           "keep = philox_keep(seed, thr, i, k, TILE_M, BLOCK_K, N_ROUNDS)",
           (MIXED_TESTS,), k="triton_kernels_match and segments",
           why="the shrink keys its mask by the sorted position: the backward regenerates another mask"),
    Mutant("mixed_kernel_rows_dropout_unscaled", MIXED_K,
           "x = tl.where(tl.reshape(keep, (BLOCK_K,)), x * inv_keep, 0.0)",
           "x = tl.where(tl.reshape(keep, (BLOCK_K,)), x, 0.0)",
           (MIXED_TESTS,), k="triton_kernels_match and primes", why="the decode shrink drops without 1/(1-p)"),
    Mutant("mixed_kernel_grad_reads_previous_segment", MIXED_K,
           "lo = tl.load(seg_start_ptr + a + 1)",
           "lo = tl.load(seg_start_ptr + a)",
           (MIXED_TESTS,), k="triton_kernels_match and three", why="dA / dB sum the previous segment's rows too"),
    Mutant("mixed_kernel_segment_term_unscaled", MIXED_K,
           "        acc = low_rank_dot(l.to(tl.float32) * scale, u, acc, cdt, LO_FP32, DOT_PRECISION)\n    return acc",
           "        acc = low_rank_dot(l.to(tl.float32), u, acc, cdt, LO_FP32, DOT_PRECISION)\n    return acc",
           (f"{MIXED_TESTS}::test_triton_cublas_composition_matches_the_oracle",),
           why="the segment tiles' low-rank term (fused GEMM and segment expand) loses s_a"),
    Mutant("mixed_kernel_dx_without_mask", MIXED_K,
           "packed_b=False, scale=False,\n                            dropout=dropout, lo_fp32=lo_fp32)",
           "packed_b=False, scale=False,\n                            dropout=False, lo_fp32=lo_fp32)",
           (MIXED_TESTS,), k="triton_kernels_match and three", why="dx's low-rank term misses the dropout mask"),
    Mutant("mixed_peft_rows_in_wrong_order", MIXED_PEFT,
           "index = sample if rows_per_sample == 1 else sample[:, None].expand(len(batch.key), rows_per_sample).reshape(-1)",
           "index = sample if rows_per_sample == 1 else sample.repeat(rows_per_sample)",
           (f"{MIXED_PEFT_TESTS}::test_forward_equals_peft_mixed_batch",),
           why="a sample's tokens take other samples' adapters"),
    Mutant("mixed_peft_lora_bias_unscaled", MIXED_PEFT,
           "zero if b is None else linear_fuser._scaled(b, s).to(y.dtype)",
           "zero if b is None else b.to(y.dtype)",
           (f"{MIXED_PEFT_TESTS}::test_forward_equals_peft_mixed_batch",), why="lora_bias added without s_a"),
    Mutant("mixed_peft_one_dropout_for_all", MIXED_PEFT,
           "ps.append(float(d.p) if d.training and type(d) is Dropout else 0.0)",
           "ps.append(0.5 if d.training else 0.0)",
           (f"{MIXED_PEFT_TESTS}::test_dropout_is_per_adapter_in_training",),
           why="every adapter drops at one rate in training"),
    Mutant("mixed_bank_trusts_stale_views", MIXED_PEFT,
           "        if ([a_ptrs[i] for i in at] == list(map(_data_ptr, As))",
           "        if True or ([a_ptrs[i] for i in at] == list(map(_data_ptr, As))",
           (f"{MIXED_PEFT_TESTS}::test_the_bank_reads_the_parameters_live",),
           why="a parameter given new storage is still read from the bank: its old values, silently"),
    Mutant("mixed_bank_keeps_deleted_adapters", MIXED_PEFT,
           "        if tuple(A_mods) != self.held:\n            return None\n        at = ",
           "        at = ",
           (f"{MIXED_PEFT_TESTS}::test_the_bank_reads_the_parameters_live",),
           why="a deleted adapter's weights stay in the bank, held in memory for the model's lifetime"),
    Mutant("mixed_bank_stands_in_for_others", MIXED_PEFT,
           "        if None in at:  # an adapter outside the bank (another dtype, say)\n            return None\n",
           "",
           (f"{MIXED_PEFT_TESTS}::test_the_bank_never_stands_in_for_an_adapter_it_does_not_hold",),
           why="a batch naming as many adapters as the bank holds, one outside it: that one's rows run the base"),
    Mutant("mixed_bank_unused", MIXED_PEFT,
           "    found = _bank(layer, used, As, Bs) if not torch.is_grad_enabled() else None",
           "    found = None",
           (f"{MIXED_PEFT_TESTS}::test_mixed_batch_runs_the_fused_op",),
           why="inference packs a copy of the adapters every call"),
    Mutant("mixed_bank_of_inference_tensors", MIXED_PEFT,
           "        with torch.inference_mode(False), torch.no_grad():",
           "        with torch.no_grad():",
           (f"{MIXED_PEFT_TESTS}::test_the_bank_survives_inference_mode_save_and_load",),
           why="a bank built in inference mode turns the adapters into inference tensors: training then fails"),
    Mutant("mixed_names_kept_when_changed", MIXED_PEFT,
           "    if last is None or last.key != key:",
           "    if last is None:",
           (MIXED_PEFT_TESTS,),
           why="a batch with other adapter_names runs with the previous batch's names"),
    Mutant("mixed_used_kept_when_adapters_change", MIXED_PEFT,
           "    if hit is not None and hit[0] is batch and hit[1] == held:",
           "    if hit is not None and hit[0] is batch:",
           (MIXED_PEFT_TESTS,),
           why="an adapter added to a layer is not used for the same names: its rows run the base"),
    Mutant("mixed_bank_index_kept_when_names_change", MIXED_PEFT,
           "        if hit is not None and hit[0] is batch and hit[1] == device:",
           "        if hit is not None:",
           (MIXED_PEFT_TESTS,),
           why="the bank reuses the last batch's row index for another batch"),
    Mutant("mixed_bank_scalings_kept_when_changed", MIXED_PEFT,
           "                and all(map(operator.is_, hit[0], scalings))):",
           "                ):",
           (MIXED_PEFT_TESTS,),
           why="a scaling changed (set_scale, scale_layer) is not seen: the last call's scalings"),
    Mutant("mixed_bank_scalings_tensors_kept", MIXED_PEFT,
           "        if all(type(v) in (float, int) for v in scalings):",
           "        if True:",
           (MIXED_PEFT_TESTS,),
           why="a tensor scaling written in place (PEFT's hot-swap) is not seen: the last call's value"),
    Mutant("mixed_index_cache_read_while_compiling", MIXED_PEFT,
           "    if torch.compiler.is_compiling():  # a constant of the graph: no cache (dynamo cannot read the inference",
           "    if False:  # a constant of the graph: no cache (dynamo cannot read the inference",
           (f"{MIXED_PEFT_TESTS}::test_a_mixed_batch_compiles_in_one_graph",),
           why="the PEFT-level call reads the inference mode while torch.compile traces it: a graph break"),
    Mutant("mixed_index_cached_across_inference_mode", MIXED_PEFT,
           "    key = (batch, tuple(adapters), str(device), torch.is_inference_mode_enabled())",
           "    key = (batch, tuple(adapters), str(device))",
           (f"{MIXED_PEFT_TESTS}::test_a_batch_run_in_inference_mode_then_trains",),
           why="a row index made in inference mode reaches a training call: its backward cannot save it"),
    Mutant("mixed_scalings_cached_across_inference_mode", "fastlora/mixed.py",
           "    key = (tuple(float(s) for s in scalings), str(device), torch.is_inference_mode_enabled())",
           "    key = (tuple(float(s) for s in scalings), str(device))",
           (f"{MIXED_PEFT_TESTS}::test_a_batch_run_in_inference_mode_then_trains",),
           why="scalings made in inference mode reach a training call: its backward cannot save them"),
    Mutant("mixed_training_opt_in_ignored", MIXED_PEFT,
           'lowered = kwargs.get("adapter_names") is not None and tuner.training',
           "lowered = False",
           (f"{MIXED_PEFT_TESTS}::test_training_requires_the_opt_in_and_the_fastlora_router",),
           why="allow_mixed_batch_training does not let PEFT's check pass"),
    Mutant("mixed_training_checkpointing_allowed", MIXED_PEFT,
           'if lowered and any(getattr(m, "gradient_checkpointing", False) is True for m in tuner.modules()):',
           'if False:',
           (f"{MIXED_PEFT_TESTS}::test_gradient_checkpointing_is_refused_not_silently_wrong",),
           why="checkpointed layers recompute without adapter_names: wrong gradients, silently"),
    Mutant("mixed_embedding_unscaled", "fastlora/mixed.py",
           "after_A = after_A * (s.to(after_A.dtype) if isinstance(s, Tensor) else s)",
           "after_A = after_A",
           (f"{MIXED_TESTS}::test_embedding_mixed_matches_the_oracle_and_trains_each_adapter_on_its_tokens",),
           why="the embedding's adapters added without their scaling"),
    Mutant("mixed_index_per_sample_misexpanded", "fastlora/mixed.py",
           "return idx[:, None].expand(shape[0], math.prod(shape[1:])).reshape(-1)",
           "return idx.repeat(math.prod(shape[1:]))",
           (f"{MIXED_TESTS}::test_lora_linear_mixed_forward_backward",),
           why="a per-sample index spread over the wrong rows"),
]


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------

_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".benchmarks",
                                 "*.png", "build", "dist")


def _copy_repo(dest: str) -> None:
    shutil.copytree(ROOT, dest, ignore=_IGNORE, symlinks=True)
    link = os.path.join(dest, "fastlora", "kernels")
    if not os.path.exists(link):  # `import fastlora.kernels` must find the copy's kernels/, not the installed one
        os.symlink(os.path.join("..", "kernels"), link)


def _apply(root: str, mutant: Mutant) -> None:
    path = os.path.join(root, mutant.file)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(mutant.original)
    if count != 1:
        raise RuntimeError(f"{mutant.name}: the original snippet occurs {count} times in {mutant.file}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(mutant.original, mutant.replacement))


def _env(root: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # torch.compile's on-disk caches (FX graph, AOTAutograd) key on the traced graph, not on the Python source of a
    # custom op's backward: a cached backward from an unmutated run would hide a mutant. A fresh cache per copy.
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.path.dirname(root), "inductor-cache")
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    env["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    env["TRITON_CACHE_DIR"] = os.path.join(os.path.dirname(root), "triton-cache")
    env.setdefault("FASTLORA_AUTOTUNE", "0")
    return env


def _pytest(root: str, tests, k, timeout: float):
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    if k:
        cmd += ["-k", k]
    try:
        proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    return proc.returncode, proc.stdout + proc.stderr


def _check_isolation(root: str) -> None:
    code = ("import fastlora, fastlora.kernels, fastlora.kernels.dropout as d; "
            "print(fastlora.__file__); print(d.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=_env(root), capture_output=True, text=True)
    files = out.stdout.split()
    real_root = os.path.realpath(root)
    if out.returncode or len(files) != 2 or not all(os.path.realpath(f).startswith(real_root) for f in files):
        raise RuntimeError(f"the copy in {root} does not import its own fastlora / kernels:\n{out.stdout}{out.stderr}")


def run_mutant(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """('caught' | 'survived' | 'error', seconds, last lines of pytest's output)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"fastlora-mutant-{mutant.name}-") as tmp:
        root = os.path.join(tmp, "repo")
        _copy_repo(root)
        _apply(root, mutant)
        rc, out = _pytest(root, mutant.tests, mutant.k, timeout)
    tail = "\n".join(out.strip().splitlines()[-3:])
    if rc == "timeout":
        verdict = "caught"  # a hang is noticed, if slowly
        tail = f"timed out after {timeout:.0f} s"
    elif rc == 0:
        verdict = "survived"
    elif rc in (1, 2) or (isinstance(rc, int) and rc < 0):  # failures, collection errors (e.g. import), crash
        verdict = "caught"
    else:  # 3 internal error, 4 usage error (a node id that does not exist), 5 no tests collected
        verdict = "error"
    return verdict, time.monotonic() - start, tail


def baseline(mutants, timeout: float) -> None:
    """The unmutated copy passes each distinct selection: otherwise 'caught' would mean nothing."""
    with tempfile.TemporaryDirectory(prefix="fastlora-mutant-baseline-") as tmp:
        root = os.path.join(tmp, "repo")
        _copy_repo(root)
        _check_isolation(root)
        seen = set()
        for m in mutants:
            key = (m.tests, m.k)
            if key in seen:
                continue
            seen.add(key)
            rc, out = _pytest(root, m.tests, m.k, timeout)
            if rc != 0:
                raise SystemExit(f"baseline failed for {' '.join(m.tests)} -k {m.k!r} (rc {rc}):\n{out[-3000:]}")
            print(f"baseline ok: {' '.join(m.tests)}" + (f" -k {m.k!r}" if m.k else ""), flush=True)


def _select(names: str | None):
    if not names:
        return list(MUTANTS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    chosen = [m for m in MUTANTS if any(m.name == w or m.name.startswith(w) for w in wanted)]
    if not chosen:
        raise SystemExit(f"no mutant matches {names!r}; see --list")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", help="comma-separated mutant names (or prefixes)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at a time (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (default 600)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated baseline run")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's last lines for every mutant")
    args = parser.parse_args(argv)
    chosen = _select(args.only)
    if args.list:
        for m in chosen:
            sel = " ".join(m.tests) + (f" -k '{m.k}'" if m.k else "")
            print(f"{m.name:40s} {m.file:34s} {m.why}\n{'':40s} tests: {sel}")
        print(f"{len(chosen)} mutants")
        return 0
    if not args.no_baseline:
        baseline(chosen, args.timeout)
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_mutant, m, args.timeout): m for m in chosen}
        for fut in concurrent.futures.as_completed(futures):
            m = futures[fut]
            try:
                verdict, secs, tail = fut.result()
            except Exception as e:  # noqa: BLE001 - report and go on
                verdict, secs, tail = "error", 0.0, repr(e)
            results[m.name] = (verdict, secs)
            print(f"{verdict.upper():9s} {m.name:40s} {secs:6.1f} s", flush=True)
            if args.verbose or verdict != "caught":
                print("    " + tail.replace("\n", "\n    "), flush=True)
    caught = sum(v == "caught" for v, _ in results.values())
    print("\n| mutant | file | result | seconds |\n|---|---|---|---|")
    for m in chosen:
        v, s = results[m.name]
        print(f"| {m.name} | {m.file} | {v} | {s:.0f} |")
    print(f"\nmutation score: {caught}/{len(chosen)} caught "
          f"({100.0 * caught / max(1, len(chosen)):.0f}%)")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
