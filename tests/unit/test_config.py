"""Invalid engine configs fail at construction with a message that says what to change."""
import pytest

from replica import ConfigError, EngineConfig


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(batch_buckets=(4, 2)), "sorted and unique"),
    (dict(batch_buckets=()), "non-empty"),
    (dict(batch_buckets=(0, 1)), "positive integers"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(max_seq_len=1), "max_seq_len=1"),
    (dict(memory_utilization=1.5), "memory_utilization"),
    (dict(fallback="drop"), "fallback='drop'"),
    (dict(fallback="queue", max_num_seqs=80, batch_buckets=(1, 2, 4, 8)), "add a bucket >= 80"),
        (dict(block_size=12), "block_size=12"),
        (dict(expected_seq_len=4096), "expected_seq_len=4096"),
])
def test_invalid_configs_say_what_to_change(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        EngineConfig(**kwargs)


def test_lists_from_yaml_are_frozen_to_tuples():
    c = EngineConfig(batch_buckets=[1, 2, 8])
    assert c.batch_buckets == (1, 2, 8)


def test_unknown_model_sources_are_clear_errors():
    from replica import Engine

    with pytest.raises(ConfigError, match="random:tiny"):
        Engine(EngineConfig(model="random:huge", device="cpu"))
    with pytest.raises(ConfigError, match="never downloads"):
        Engine(EngineConfig(model="meta-llama/Llama-3.1-8B", device="cpu"))
