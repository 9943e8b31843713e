"""benchmarks/cuda_attention.py, the host side of the CUDA decode attention probe, on CPU:
- its ctypes `_Args` mirrors the .cu's `struct Args` field for field (names, order, kinds), since
  the kernel takes the struct by value and a mismatch would read wrong strides silently on the GPU;
- `fits` takes exactly the layouts the .cu handles (head_dim 128, block 16, G <= 8, 16-bit,
  contiguous rows), so the probe refuses the rest instead of computing garbage;
- every probe config fits an SM's shared memory and 16 warps at its CTA count."""
from __future__ import annotations

import ctypes
import importlib.util
import re

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

KINDS = {"float": ctypes.c_float, "int": ctypes.c_int, "int64_t": ctypes.c_int64}


def cu_struct_fields(source: str) -> list[tuple[str, type]]:
    """(name, ctypes type) of each field of `struct Args` in the .cu, in order."""
    body = re.search(r"struct Args \{(.*?)\};", source, re.S).group(1)
    fields = []
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        if "*" in decl:                       # one pointer per declaration: `const DTYPE* q`
            kind, names = ctypes.c_void_p, decl.split("*", 1)[1]
        else:                                 # `int split, num_splits, ...`
            type_name, names = decl.split(None, 1)
            kind = KINDS[type_name]
        fields += [(name, kind) for name in re.split(r"\s*,\s*", names.strip())]
    return fields


def test_ctypes_args_mirror_the_cuda_struct():
    from benchmarks import cuda_attention as CA
    expected = cu_struct_fields(open(CA.SOURCE).read())
    assert len(expected) == 28
    assert [(n, t) for n, t in CA._Args._fields_] == expected
    assert ctypes.sizeof(CA._Args) == 11 * 8 + 4 + 5 * 4 + 11 * 8


def _cache(kvh=8, bs=16, hd=128, dtype=torch.bfloat16):
    return torch.zeros(4, kvh, bs, hd, dtype=dtype)


@pytest.mark.parametrize("q_shape,cache,ok", [
    ((2, 32, 128), _cache(), True),                            # llama-8b: G = 4
    ((2, 28, 128), _cache(kvh=4), True),                       # qwen2-7b: G = 7
    ((2, 32, 128), _cache(kvh=2), False),                      # G = 16 > 8
    ((2, 32, 64), _cache(hd=64), False),                       # head_dim 64
    ((2, 32, 128), _cache(bs=32), False),                      # block size 32
])
def test_fits_takes_only_the_layouts_the_kernel_handles(q_shape, cache, ok):
    from benchmarks import cuda_attention as CA
    q = torch.zeros(q_shape, dtype=torch.bfloat16)
    assert CA.fits(q, cache, cache.clone()) is ok


def test_fits_refuses_fp32_and_strided_rows():
    from benchmarks import cuda_attention as CA
    cache = _cache()
    assert not CA.fits(torch.zeros(2, 32, 128), _cache(dtype=torch.float32), _cache(dtype=torch.float32))
    wide = torch.zeros(4, 8, 16, 256, dtype=torch.bfloat16)[..., :128]      # rows 512 bytes apart
    assert not CA.fits(torch.zeros(2, 32, 128, dtype=torch.bfloat16), wide, cache)


def test_probe_configs_fit_an_sm():
    from benchmarks import cuda_attention as CA
    from benchmarks.cuda_attention_probe import CONFIGS
    for name, (warps, stages, _) in CONFIGS.items():
        ctas = CA.ctas_per_sm(warps, stages)
        assert ctas * (CA.smem_bytes(warps, stages) + 1024) <= 228 * 1024, name
        assert 1 <= ctas * warps <= 16, name
