"""Packed prefill: several sequences' prompt chunks in one forward give the same logits and write
the same KV entries as one forward per chunk (the block-diagonal mask keeps them apart)."""
import torch

from replica.kv_pool import KVPool
from replica.loader import load_model


def test_packed_chunks_equal_one_forward_each(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir[0], 64, torch.device("cpu"), torch.float32)
    s = model.shape
    pools = [KVPool(4, s.num_layers, s.num_kv_heads, 64, s.head_dim, torch.float32, torch.device("cpu"))
             for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    prompt = {slot: torch.randint(0, 256, (n,), generator=g) for slot, n in ((0, 9), (2, 5), (3, 12))}
    with torch.inference_mode():
        # Earlier chunks first (separately), so the packed step has prefixes to attend to.
        for kv in pools:
            model.prefill([(prompt[0][:4], 0, 0)], kv)
            model.prefill([(prompt[3][:7], 0, 3)], kv)
        chunks = [(prompt[0][4:], 4, 0), (prompt[2], 0, 2), (prompt[3][7:], 7, 3)]
        packed = model.prefill(chunks, pools[0])
        single = torch.cat([model.prefill([c], pools[1]) for c in chunks])
    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)
    for a, b in zip(pools[0].k + pools[0].v, pools[1].k + pools[1].v):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)   # fp32, different GEMM shapes
    assert packed.shape == (3, s.vocab_size) and not torch.equal(packed[0], packed[1])
