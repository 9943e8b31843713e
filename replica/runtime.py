"""ModelRuntime: the tensors of one engine - weights, KV pool, slots, decode graphs - and how they are
sized and built at startup.

Startup order (logged with sizes and seconds):
1. load weights (replica/loader.py);
2. measure activation memory: one eager decode at the largest bucket and one prefill chunk against a
   one-slot provisional pool (the graph pool holds about the decode peak);
3. size the KV pool from the budget: memory_utilization x card memory - memory in use - step 2,
   or `kv_cache_bytes` when set; allocate it once;
4. capture every bucket's graphs (replica/graphs.py), then close capture.
"""
from __future__ import annotations

import logging
import time

import torch

from replica.config import ConfigError, EngineConfig
from replica.graphs import DecodeGraphs, InFlight
from replica.kv_pool import KVPool, SlotAllocator
from replica.loader import load_model, resolve_dtype
from replica.stats import StartupReport

log = logging.getLogger("replica")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class ModelRuntime:
    def __init__(self, config: EngineConfig):
        self.config = c = config
        self.device = resolve_device(c.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(c.dtype, self.device)
        self.max_seq_len = c.max_seq_len
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model, self.hf_config = load_model(c.model, c.max_seq_len, self.device, self.dtype, c.seed)
        self._sync()
        load_s = time.perf_counter() - t0
        weights = self.model.weight_bytes()
        log.info("loaded %s: %.2f GiB of weights in %.2f s on %s", c.model, weights / 2**30, load_s, self.device)
        activation = self._measure_activation_bytes() if self.device.type == "cuda" else 0
        num_slots = self._num_slots(activation)
        s = self.model.shape
        self.kv = KVPool(num_slots, s.num_layers, s.num_kv_heads, c.max_seq_len, s.head_dim, self.dtype, self.device)
        self.slots = SlotAllocator(num_slots)
        log.info("KV pool: %d slots x %d tokens = %.2f GiB (activation reserve %.1f MiB)",
                 num_slots, c.max_seq_len, self.kv.nbytes / 2**30, activation / 2**20)
        self.graphs = DecodeGraphs(self.model, self.kv, c.batch_buckets, num_slots, c.use_cuda_graphs)
        with torch.inference_mode():
            self.graphs.capture_all(log=log.info)
        # fallback="queue" never decodes more rows than the largest bucket; config validation keeps
        # max_num_seqs <= that bucket, so this only matters for an explicit kv budget.
        self.max_decode_rows = c.max_bucket if c.fallback == "queue" else num_slots
        self.startup = StartupReport(weights_bytes=weights, kv_cache_bytes=self.kv.nbytes,
                                     graph_bytes=self.graphs.graph_bytes, graph_bytes_estimate=activation,
                                     load_seconds=load_s, warmup_seconds=self.graphs.warmup_seconds,
                                     capture_seconds=self.graphs.capture_seconds)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- sizing ---------------------------------------------------------------------------------
    def _num_slots(self, activation_bytes: int) -> int:
        c, s = self.config, self.model.shape
        want = c.max_num_seqs or c.max_bucket
        per_slot = KVPool.bytes_per_slot(s.num_layers, s.num_kv_heads, c.max_seq_len, s.head_dim, self.dtype)
        if c.kv_cache_bytes is not None:
            budget = c.kv_cache_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * c.memory_utilization) - (total - free) - activation_bytes
        else:
            budget = (want + 1) * per_slot
        # +1: the scratch slot for padding rows lives in the same tensors.
        slots = min(want, budget // per_slot - 1)
        if slots < 1:
            raise ConfigError(
                f"the KV budget ({max(budget, 0) / 2**30:.2f} GiB) holds no full sequence of max_seq_len="
                f"{c.max_seq_len} ({per_slot / 2**20:.1f} MiB per slot): lower max_seq_len, raise "
                f"memory_utilization or kv_cache_bytes, or use a smaller model")
        if slots < want:
            log.warning("KV budget holds %d of the %d sequences asked for", slots, want)
        return slots

    @torch.inference_mode()
    def _measure_activation_bytes(self) -> int:
        """Peak extra memory of one eager decode at the largest bucket plus one prefill chunk, against
        a provisional one-slot pool. Bounds the graph pool and prefill's transient tensors."""
        c, s = self.config, self.model.shape
        probe = KVPool(1, s.num_layers, s.num_kv_heads, c.max_seq_len, s.head_dim, self.dtype, self.device)
        b = max(c.max_bucket, c.max_num_seqs or 0)
        self._sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        idx = torch.full((b,), probe.scratch_slot, dtype=torch.long, device=self.device)
        logits = torch.empty(b, s.vocab_size, dtype=self.dtype, device=self.device)
        self.model.decode(torch.zeros_like(idx), torch.zeros_like(idx), idx, torch.ones_like(idx), probe, logits)
        T = min(c.prefill_chunk_tokens, c.max_seq_len - 1)
        self.model.prefill([(torch.zeros(T, dtype=torch.long, device=self.device), 0, 0)], probe)
        self._sync()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del probe, idx, logits
        torch.cuda.empty_cache()
        return int(peak * 1.2) + (64 << 20)

    # -- per step (step thread) -----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """chunks: (token ids, start, slot) per sequence; one forward; logits [len(chunks), V]."""
        dev = self.device
        return self.model.prefill([(torch.tensor(ids, dtype=torch.long, device=dev), start, slot)
                                   for ids, start, slot in chunks], self.kv)

    @torch.inference_mode()
    def launch_decode(self, rows: list[tuple], sampling: bool) -> InFlight:
        return self.graphs.launch(rows, sampling)

    def collect_decode(self, step: InFlight) -> list[int]:
        return self.graphs.collect(step)   # the step's one host wait
