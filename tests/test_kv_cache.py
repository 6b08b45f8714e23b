"""The KV cache grows with the stream (issue 13, point 2): a fresh cache holds nothing, a step grows it to
the span it reads, a prompt snapshot holds only the prompt's frames, and none of this changes a single
output bit against a ring allocated at full size from the start (what the cache did before)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.model.session import BUFFER_CACHE_LIMIT, bound_buffer_cache
from callbot.engine.model.transformer import Transformer, TransformerConfig, ring_span
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

CFG = TransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=96, context=100)


def _full_size(cache):
    """The cache as it was before growth: every ring allocated at its capacity."""
    for layer in cache.layers:
        layer.fit(layer.capacity)
    return cache


@pytest.mark.parametrize("positions", [1, 2, 3], ids=["one-position", "two-positions", "three-positions"])
def test_a_growing_cache_gives_the_outputs_of_a_full_size_ring(positions):
    mx.random.seed(5)
    model = Transformer(CFG)
    mx.eval(model.parameters())
    rng = np.random.default_rng(1)
    grown, full = model.make_cache(), _full_size(model.make_cache())
    assert grown.layers[0].allocated == 0
    for t in range(0, 260, positions):  # past the 100-position context: the ring rotates
        x = mx.array(rng.standard_normal((1, positions, 32)).astype(np.float32))
        a, b = model.step(x, grown), model.step(x, full)
        assert np.array(a).tobytes() == np.array(b).tobytes(), f"position {t}"
        if positions == 1:
            assert grown.layers[0].allocated == ring_span(t, CFG.context), f"position {t}"
        assert grown.layers[0].allocated <= CFG.context
    assert grown.layers[0].allocated == CFG.context


def test_ring_spans():
    assert [ring_span(o, 3000) for o in (0, 31, 32, 63, 64, 1023, 1024, 2047, 2048, 2998, 2999, 5000)] == [
        32, 32, 64, 64, 128, 1024, 2048, 2048, 3000, 3000, 3000, 3000]
    assert ring_span(0, 16) == 16


def test_restoring_a_snapshot_takes_its_capacity_and_checks_the_shape():
    model = Transformer(CFG)
    other = Transformer(TransformerConfig(d_model=32, num_heads=2, num_layers=2, dim_feedforward=96, context=100))
    cache = model.make_cache()
    model.step(mx.zeros((1, 1, 32)), cache)
    snap = cache.snapshot(compact=True)
    assert snap.capacity == 100 and snap.layers[0][0].shape == (1, 4, 1, 8)
    fresh = model.make_cache()
    fresh.restore(snap)
    assert fresh.offset == 1 and fresh.layers[0].allocated == 1
    with pytest.raises(ValueError, match="expected"):
        other.make_cache().restore(snap)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(write_tiny_model_dir(tmp_path_factory.mktemp("personaplex")), lm_config=lm_cfg,
                      mimi_config=mimi_cfg, cache_dir=False, progress=False)


def test_a_prompt_snapshot_holds_the_prompt_frames_and_a_call_grows_from_there(model):
    snapshot = model.prepare("NATF0", "You are Jane.")
    frames = snapshot.lm.cache.offset
    assert frames == snapshot.prompt_frames  # one transformer position per prompt frame
    for keys, values, _ in snapshot.lm.cache.layers:
        assert keys.shape[2] == values.shape[2] == frames  # not the 64-slot span the last step read
    session = model.open_session(snapshot=snapshot, seed=1)
    silence = np.zeros(1920, np.float32)
    for _ in range(3):
        session.step(silence)
    layer = session._lm_state.cache.layers[0]
    assert layer.allocated == ring_span(layer.offset - 1, layer.capacity) < layer.capacity
    # the snapshot's own arrays are untouched by the call
    assert snapshot.lm.cache.layers[0][0].shape[2] <= frames


def test_the_buffer_cache_is_bounded_when_a_model_loads(model):
    previous = bound_buffer_cache(1 << 20)
    assert previous == BUFFER_CACHE_LIMIT
    assert bound_buffer_cache(previous) == 1 << 20
