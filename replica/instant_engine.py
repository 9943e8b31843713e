"""`InstantEngine`: a stand-in for `replica.Engine` (AppArgs.engine_class) that loads nothing and
answers every request at once with one token. Deploys start without torch's import or a model,
so what a test or benchmark measures is the path in front of the engine (placement, routing,
the ingress). Subclass and override `generate` to hold requests.
"""
from __future__ import annotations

from replica.sampling_params import GenerationChunk
from replica.stats import EngineStats


class InstantEngine:
    def __init__(self, config):
        self.model_name = config.model
        self._buckets = tuple(config.batch_buckets)
        self._max_seq_len = config.max_seq_len

    async def generate(self, request):
        yield GenerationChunk(request.request_id or "r", (97,), "a", "length", prompt_tokens=1,
                              completion_tokens=1)

    def stats(self) -> EngineStats:
        n = self._buckets[-1]
        return EngineStats(captured_buckets=self._buckets, graphs=False, max_seq_len=self._max_seq_len,
                           max_num_seqs=n, running=0, free_slots=n, queued=0, fallback="eager")

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
