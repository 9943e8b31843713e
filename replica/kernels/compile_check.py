"""Compile every Triton kernel for an NVIDIA GPU target on a machine without a GPU.

    python -m replica.kernels.compile_check [--arch 90] [--full]   # --full: + tuning variants

Uses Triton's bundled ptxas / cuobjdump, so CI (CPU only) catches code that the interpreter accepts
but the GPU compiler rejects, register spills and shared-memory overflows. Configs mirror what the
wrappers launch for llama-8b (bf16, hd=128, G=4), the tiny test model (hd=16) and edge cases
(fp32, hd=80 with unaligned strides, large GQA groups, hd=256, block sizes 8..128); the paged
kernels take their constexprs from the wrappers' own planners (`paged_attention.decode_plan`,
`paged_prefill.prefill_config`). Pointer arguments and strides are marked 16-byte divisible as
Triton's launcher specialises them for contiguous caches; the decode kernels' runtime `split` /
`num_splits` carry no hint, as at run time (they are excluded from specialisation).
Prints one JSON object {config: {"shared": bytes, "regs": n, "spill_bytes": n}}.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import torch

from replica.kernels import fused, paged_attention, paged_prefill, sample

_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _compile(fn, types: dict, consts: dict, arch: int, num_warps: int, num_stages: int = 2,
             aligned: bool = True):
    """types: {arg: triton type string} for runtime args; constexprs come from `consts`."""
    signature = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    div = [["tt.divisibility", 16]]
    attrs = {(fn.arg_names.index(n),): div for n, t in types.items()
             if t.startswith("*") or (aligned and n.startswith("stride"))}
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _resources(kernel) -> dict:
    """Registers and spill (local memory) bytes from the cubin, shared memory from Triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([os.path.join(_TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", text)}
    # spills live in the stack frame (these kernels have no local arrays)
    return dict(shared=kernel.metadata.shared, regs=usage.get("REG", -1),
                spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0))


def _fused(arch: int) -> dict:
    out = {}
    for dt, d in (("bf16", 4096), ("fp32", 64)):
        p = "*" + dt
        for res in (False, True):
            types = dict(x_ptr=p, res_ptr=p, w_ptr=p, out_ptr=p, stride_x="i32",
                         stride_res="i32", stride_out="i32", D="i32", eps="fp32")
            block = triton.next_power_of_2(d)
            k = _compile(fused._rms_norm_kernel, types, dict(HAS_RESIDUAL=res, BLOCK_D=block),
                         arch, 8 if block > 2048 else 4)
            out[f"{'add_' if res else ''}rms_norm.{dt}_d{d}"] = _resources(k)
        types = dict(in_ptr=p, out_ptr=p, stride_in="i32", stride_out="i32", INTER="i32")
        k = _compile(fused._silu_mul_kernel, types, dict(BLOCK=1024), arch, 4)
        out[f"silu_mul.{dt}"] = _resources(k)
    ints = ("stride_qkv stride_cos stride_sin stride_qn stride_qh stride_ks stride_kh "
            "stride_kl stride_vs stride_vh stride_vl").split()
    for dt, h, kvh, hd in (("bf16", 32, 8, 128), ("fp32", 4, 2, 16), ("bf16", 3, 1, 24)):
        p = "*" + dt
        types = dict(qkv_ptr=p, cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64",
                     slot_ptr="*i64", q_ptr=p, k_ptr=p, v_ptr=p, **{n: "i32" for n in ints})
        consts, warps = fused.rope_launch_config(h, kvh, hd, 16)
        k = _compile(fused._rope_store_kv_kernel, types, consts, arch, warps, aligned=hd % 16 == 0)
        out[f"rope_store_kv_paged.{dt}_hd{hd}"] = _resources(k)
    return out


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _paged_configs(full: bool):
    # name: (dtype, heads, group, head_dim, block size, aligned strides)
    configs = {
        "8b_bf16_bs16": ("bf16", 32, 4, 128, 16, True),
        "8b_fp32_bs16": ("fp32", 32, 4, 128, 16, True),
        "tiny_hd16_bs16": ("bf16", 4, 2, 16, 16, True),
        "hd80_g3_bs8": ("bf16", 6, 3, 80, 8, True),
        "hd72_unaligned_bs32": ("fp16", 2, 1, 72, 32, False),
        "hd256_g2_bs16": ("bf16", 16, 2, 256, 16, True),
        "qwen3_g2_hd128_bs16": ("bf16", 16, 2, 128, 16, True),
    }
    if full:
        configs.update({
            "group8_hd128_bs16": ("bf16", 64, 8, 128, 16, True),
            "8b_bf16_bs8": ("bf16", 32, 4, 128, 8, True),
            "8b_bf16_bs32": ("bf16", 32, 4, 128, 32, True),
            "8b_bf16_bs128": ("bf16", 32, 4, 128, 128, True),
            "group32_hd64_bs16": ("bf16", 64, 32, 64, 16, True),
            "qwen7b_g7_bs16": ("bf16", 28, 7, 128, 16, True),
        })
    return configs


# The tall prefill tiles (256 x 128 at 16 warps) spill 48-88 bytes; every spill-free tall config
# measured 1.2-1.3x slower on an H200 (paged_prefill.prefill_config). Anything else: none.
TALL_TILE_SPILL_BYTES = 96


def spill_allowance(result_name: str) -> int:
    """Spill bytes accepted for one `compile_all` result (the tall prefill tiles' only)."""
    kernel, _, config = result_name.partition(".")
    spec = _paged_configs(True).get(config)
    if kernel != "paged_prefill" or spec is None:
        return 0
    tall = paged_prefill.prefill_rows(_DTYPES[spec[0]], spec[3]) == paged_prefill.TALL_PREFILL_ROWS
    return TALL_TILE_SPILL_BYTES if tall else 0


def _paged(arch: int, full: bool) -> dict:
    out = {}
    pa, pp = paged_attention, paged_prefill
    dec_ints = ["stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                "stride_vh", "stride_vn", "stride_bt", "stride_ob", "stride_oh"]
    pre_ints = ["stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                "stride_vh", "stride_vn", "stride_bt", "stride_ot", "stride_oh"]
    for name, (dt, h, g, hd, bs, aligned) in _paged_configs(full).items():
        p, dtype = "*" + dt, _DTYPES[dt]
        _, consts = pa.decode_plan(8, h, h // g, hd, bs, 64, dtype)
        types = dict(q_ptr=p, k_ptr=p, v_ptr=p, bt_ptr="*i32", row_ptr="*i64", len_ptr="*i64",
                     out_ptr=p, po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", qk_scale="fp32",
                     split="i32", num_splits="i32", **{n: "i32" for n in dec_ints})
        k = _compile(pa._decode_split_kernel, types, consts, arch, 4, 2, aligned)
        out[f"paged_decode_split.{name}"] = _resources(k)
        k = _compile(pa._decode_split_persistent, {**types, "batch": "i32"}, consts, arch, 4, 2,
                     aligned)
        out[f"paged_decode_persistent.{name}"] = _resources(k)
        types = dict(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", len_ptr="*i64", out_ptr=p,
                     split="i32", num_splits="i32", stride_ob="i32", stride_oh="i32")
        for kind in ("heads", "rows"):
            kernel, _, meta, warps = pa.combine_plan(8, h, hd, kind)
            suffix = "" if kind == "heads" else "_rows"
            k = _compile(kernel, types, meta, arch, warps)
            out[f"paged_decode_combine{suffix}.{name}"] = _resources(k)
        types = dict(q_ptr=p, k_ptr=p, v_ptr=p, bt_ptr="*i32", tile_ptr="*i32", out_ptr=p,
                     po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", qk_scale="fp32",
                     **{n: "i32" for n in pre_ints})
        merge_types = dict(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", merge_ptr="*i32",
                           out_ptr=p, stride_ot="i32", stride_oh="i32")
        block_d = max(16, triton.next_power_of_2(hd))
        for kind, tile_tokens in (("prefill", pp.prefill_tile_tokens(dtype, hd, g)), ("decode_tiles", 1)):
            cfg = pp.prefill_config(dtype, hd, g, tile_tokens)
            warps = cfg.pop("num_warps")
            consts = dict(NUM_HEADS=h, GROUP=g, HEAD_DIM=hd, BLOCK_SIZE=bs, TILE_TOKENS=tile_tokens,
                          BLOCK_D=block_d, PRECISION="ieee" if dt == "fp32" else "tf32", **cfg)
            k = _compile(pp._prefill_kernel, types, consts, arch, warps, 2, aligned)
            out[f"paged_{kind}.{name}"] = _resources(k)
            consts = dict(NUM_HEADS=h, HEAD_DIM=hd, TILE_TOKENS=tile_tokens,
                          BLOCK_T=max(2, tile_tokens), BLOCK_D=block_d)
            k = _compile(pp._prefill_merge_kernel, merge_types, consts, arch,
                         pp.merge_warps(tile_tokens, block_d), 2, aligned)
            out[f"paged_{kind}_merge.{name}"] = _resources(k)
    return out


def _sampler(arch: int) -> dict:
    """The sampler's kernels as `sample.py` launches them (fp32 processed logits; raw logits bf16
    or fp32; table rows and steps int64)."""
    out = {}
    lp_tables = dict(rows_ptr="*i64", ints_ptr="*i64", ints_stride="i32")
    tables = dict(floats_ptr="*fp32", **lp_tables)
    k = _compile(sample._penalties_kernel, dict(x_ptr="*fp32", x_stride="i32", rows_ptr="*i64",
                                                floats_ptr="*fp32", counts_ptr="*i32", seen_ptr="*i1",
                                                table_stride="i32", V="i32"), dict(BLOCK=sample.BLOCK), arch, 4)
    out["sample_penalties"] = _resources(k)
    draw = dict(x_ptr="*fp32", x_stride="i32", steps_ptr="*i64", part_f_ptr="*fp32", part_i_ptr="*i32", V="i32",
                **tables)
    k = _compile(sample._draw_split_kernel, draw, dict(SPLIT=sample.SPLIT, BLOCK=sample.BLOCK), arch, 4)
    out["sample_draw_split"] = _resources(k)
    k = _compile(sample._draw_kernel, dict(out_ptr="*i64", n_splits="i32", **draw),
                 dict(SPLITS_P2=16, BLOCK=sample.BLOCK, MAX_ROUNDS=sample.MAX_ROUNDS), arch, 4)
    out["sample_draw"] = _resources(k)
    for dt in ("bf16", "fp32"):
        k = _compile(sample._lp_chunk_kernel, dict(raw_ptr="*" + dt, raw_stride="i32", vals_ptr="*fp32",
                                                   ids_ptr="*i32", stat_ptr="*fp32", V="i32", **lp_tables),
                     dict(CHUNK=sample.LP_CHUNK, K=sample.LP_K), arch, 4)
        out[f"sample_logprobs_chunks.{dt}"] = _resources(k)
        k = _compile(sample._lp_merge_kernel, dict(raw_ptr="*" + dt, raw_stride="i32", tokens_ptr="*i64",
                                                   vals_ptr="*fp32", ids_ptr="*i32", stat_ptr="*fp32",
                                                   lp_ptr="*fp32", top_vals_ptr="*fp32", top_ids_ptr="*i64",
                                                   n_chunks="i32", **lp_tables),
                     dict(TOP=20, CANDS=32 * sample.LP_K, CHUNKS_P2=32), arch, 4)
        out[f"sample_logprobs_merge.{dt}"] = _resources(k)
    return out


def compile_all(arch: int = 90, full: bool = False) -> dict:
    return {**_fused(arch), **_paged(arch, full), **_sampler(arch)}


if __name__ == "__main__":
    args = sys.argv[1:]
    arch = int(args[args.index("--arch") + 1]) if "--arch" in args else 90
    print(json.dumps(compile_all(arch, full="--full" in args), indent=1))
