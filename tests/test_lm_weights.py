"""engine.weights: locating, checking, converting, quantizing and caching the LM checkpoint (tiny model)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from callbot.engine.model.lm import LM
from callbot.engine.model.lm_config import LmConfig, personaplex_7b
from callbot.engine.model.sampling import GREEDY
from callbot.engine.model.weights import (HF_REPO, LM_FILE, WeightsError, checkpoint_layout, find_weights, load_lm,
                                    parse_quantization, quantized_paths, read_safetensors_header)

from tests.tiny_lm import TINY_LM, tiny_lm_tensors, write_safetensors, write_tiny_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_lm")
    write_tiny_lm(d)
    return d


def _frames(lm, n=6, seed=0):
    """All logits of a few frames whose every token is forced (the same inputs for every model)."""
    state = lm.new_state(GREEDY)
    rng = np.random.default_rng(seed)
    cfg = lm.cfg
    out = []
    for _ in range(n):
        user, agent = rng.integers(0, cfg.card, (2, cfg.agent_codebooks))
        text = int(rng.integers(0, cfg.text_card))
        _, logits = lm.step_with_logits(state, user, agent_codes=agent, text_token=text)
        if logits is not None:
            out.append(np.concatenate([logits.text, logits.audio.ravel()]))
    return np.stack(out)


def _linear_and_embedding_paths(cfg: LmConfig) -> list[str]:
    return [p for p, m in LM(cfg).named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]


def test_checkpoint_layout_counts_match_the_released_files():
    assert len(checkpoint_layout(personaplex_7b())) == personaplex_7b().checkpoint_tensor_count == 475
    cfg = TINY_LM
    assert len(checkpoint_layout(cfg)) == 67 + 6 * cfg.num_layers + 36 * cfg.depformer_num_layers


@pytest.mark.parametrize("quantize,bits,group", [("q8", 8, 64), ("q4", 4, 32), ("q4", 4, 64)])
def test_quantized_load_swaps_every_linear_and_embedding(tiny_dir, tmp_path, quantize, bits, group):
    lm = load_lm(tiny_dir, TINY_LM, quantize=quantize, group_size=group, cache_dir=tmp_path, progress=False)
    expected = _linear_and_embedding_paths(TINY_LM)
    assert sorted(quantized_paths(lm)) == sorted(expected)
    assert len(expected) == 2 + TINY_LM.n_q + 3 * TINY_LM.dep_q + 4 * TINY_LM.num_layers \
        + 4 * TINY_LM.dep_q * TINY_LM.depformer_num_layers
    layer = lm.transformer.layers[0].self_attn.in_proj
    assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (bits, group)
    assert isinstance(lm.text_emb, nn.QuantizedEmbedding)
    # It steps, and stays close to the float model (q8 closer than q4).
    ref = _frames(load_lm(tiny_dir, TINY_LM, progress=False))
    got = _frames(lm)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < (0.05 if bits == 8 else 0.5), rel
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > (0.999 if bits == 8 else 0.95)


def test_nn_quantize_alone_skips_a_bare_linear():
    """Why quantize_lm works on the whole model: nn.quantize swaps children, never its argument."""
    layer = nn.Linear(64, 64)
    nn.quantize(layer, bits=4, group_size=32)
    assert not isinstance(layer, nn.QuantizedLinear)


def test_quantized_weights_are_cached_and_reused(tiny_dir, tmp_path):
    src_dir = tmp_path / "src"
    src = write_tiny_lm(src_dir)
    cache = tmp_path / "cache"
    first = load_lm(src_dir, TINY_LM, quantize="q4", cache_dir=cache, progress=False)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    meta = json.loads((cache / files[0]).read_text())
    assert meta["quantization"] == {"bits": 4, "group_size": 64} and meta["dtype"] == "float32"
    assert meta["source"]["name"] == LM_FILE and LmConfig.from_dict(meta["config"]) == TINY_LM
    expected = _frames(first)
    # Zero the source's data (header kept): a second start that converted again would compute zeros.
    header_len = 8 + int.from_bytes(src.read_bytes()[:8], "little")
    with open(src, "r+b") as f:
        f.seek(header_len)
        f.write(bytes(src.stat().st_size - header_len))
    second = load_lm(src_dir, TINY_LM, quantize="q4", cache_dir=cache, progress=False)
    np.testing.assert_array_equal(_frames(second), expected)
    # Another group size is another cache entry.
    load_lm(tiny_dir, TINY_LM, quantize="q4", group_size=32, cache_dir=cache, progress=False)
    assert len(list(cache.iterdir())) == 4


def test_a_broken_cache_is_rebuilt(tiny_dir, tmp_path, capfd):
    cache = tmp_path / "cache"
    expected = _frames(load_lm(tiny_dir, TINY_LM, quantize="q8", cache_dir=cache, progress=False))
    weights = next(cache.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    again = load_lm(tiny_dir, TINY_LM, quantize="q8", cache_dir=cache, progress=False)
    assert "ignoring unusable converted-weights cache" in capfd.readouterr().err
    np.testing.assert_array_equal(_frames(again), expected)
    assert weights.stat().st_size > 1000


def test_first_conversion_shows_progress(tiny_dir, tmp_path, capfd):
    load_lm(tiny_dir, TINY_LM, quantize="q8", cache_dir=tmp_path, progress=True)
    err = capfd.readouterr().err
    n = TINY_LM.checkpoint_tensor_count
    assert f"converting {LM_FILE} to q8g64" in err and f"{n}/{n}" in err


def test_bf16_checkpoint_loads_as_float32_on_cpu(tmp_path):
    write_tiny_lm(tmp_path, bf16=True)
    assert {t.dtype for t in read_safetensors_header(tmp_path / LM_FILE)[0].values()} == {"BF16"}
    lm = load_lm(tmp_path, TINY_LM, progress=False)
    assert lm.text_emb.weight.dtype == mx.float32
    half = load_lm(tmp_path, TINY_LM, dtype=mx.bfloat16, progress=False)
    assert half.transformer.layers[1].gating.linear_in.weight.dtype == mx.bfloat16
    # The GPU dtype steps too (KV cache in bf16), close to float32 at bf16 precision.
    got, ref = _frames(half), _frames(lm)
    assert half.new_state().cache.layers[0].keys.dtype == mx.bfloat16
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.1


def test_missing_file_names_it(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path / LM_FILE}: missing"):
        load_lm(tmp_path, TINY_LM)
    with pytest.raises(WeightsError, match="missing"):
        find_weights(tmp_path)


def test_truncated_file_names_it(tmp_path):
    path = write_tiny_lm(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=f"{path}: truncated: .* header describes"):
        load_lm(tmp_path, TINY_LM)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(WeightsError, match="truncated or not safetensors"):
        load_lm(tmp_path, TINY_LM)
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(WeightsError, match="not a safetensors file or truncated"):
        load_lm(tmp_path, TINY_LM)


def test_mismatched_tensors_name_the_file_and_the_tensor(tmp_path):
    path = tmp_path / LM_FILE
    tensors = tiny_lm_tensors()
    tensors["transformer.layers.1.norm2.alpha"] = np.ones((1, 1, 32), np.float32)
    write_safetensors(path, tensors)
    with pytest.raises(WeightsError, match=r"tensor transformer.layers.1.norm2.alpha has shape \[1, 1, 32\], "
                                           r"expected \[1, 1, 64\]"):
        load_lm(tmp_path, TINY_LM)
    del tensors["linears.3.weight"]
    tensors["extra.weight"] = np.ones((2,), np.float32)
    tensors["transformer.layers.1.norm2.alpha"] = np.ones((1, 1, 64), np.float32)
    write_safetensors(path, tensors)
    with pytest.raises(WeightsError, match=r"1 missing \(e.g. linears.3.weight\); 1 unexpected \(e.g. extra.weight\)"):
        load_lm(tmp_path, TINY_LM)
    # The 7B config on the tiny file: every shape differs, the message says so at the first tensor.
    write_tiny_lm(tmp_path)
    with pytest.raises(WeightsError, match=f"{path}: does not match the LM config"):
        load_lm(tmp_path)


def test_weights_error_is_a_value_error():
    assert issubclass(WeightsError, ValueError)


def test_hf_cache_layout_is_found(tmp_path, monkeypatch):
    repo = tmp_path / "hf" / "hub" / ("models--" + HF_REPO.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    write_tiny_lm(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert find_weights() == snap
    load_lm(find_weights(), TINY_LM, progress=False)
    # An interrupted download leaves a dangling symlink: the error names the file.
    (snap / LM_FILE).unlink()
    (snap / LM_FILE).symlink_to(repo / "blobs" / "0123")
    with pytest.raises(WeightsError, match=f"{snap / LM_FILE}: missing from the Hugging Face cache snapshot"):
        find_weights()
    # HF_HUB_CACHE wins over HF_HOME.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(WeightsError, match="not found.*download=True"):
        find_weights()


def test_quantization_arguments_are_checked():
    assert parse_quantization(None) is None
    assert parse_quantization("q4").tag == "q4g64" and parse_quantization(8, 32).tag == "q8g32"
    with pytest.raises(ValueError, match="quantize must be"):
        parse_quantization("q3")
    with pytest.raises(ValueError, match="group_size must be"):
        parse_quantization("q4", 48)


def test_config_from_nvidia_kwargs_and_errors():
    nvidia = {"dim": 4096, "text_card": 32000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 16,
              "card": 2048, "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125, "causal": True,
              "layer_scale": None, "context": 3000, "max_period": 10000, "gating": "silu",
              "norm": "rms_norm_f32", "positional_embedding": "rope", "depformer_dim": 1024,
              "depformer_dim_feedforward": 4224, "depformer_num_heads": 16, "depformer_num_layers": 6,
              "depformer_causal": True, "depformer_layer_scale": None, "depformer_multi_linear": True,
              "depformer_context": 8, "depformer_max_period": 10000, "depformer_gating": "silu",
              "depformer_pos_emb": "none", "depformer_weights_per_step": True,
              "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]}
    assert LmConfig.from_dict(nvidia) == personaplex_7b()
    assert LmConfig.from_dict(TINY_LM.to_dict()) == TINY_LM
    with pytest.raises(ValueError, match="unknown key 'dimm'"):
        LmConfig.from_dict({**nvidia, "dimm": 1})
    with pytest.raises(ValueError, match="gating='gelu' is not supported"):
        LmConfig.from_dict({**nvidia, "gating": "gelu"})
    with pytest.raises(ValueError, match="one delay per stream"):
        LmConfig.from_dict({**nvidia, "delays": [0, 1]})
    with pytest.raises(ValueError, match="dep_q must be between 8"):
        dataclasses.replace(TINY_LM, dep_q=4)
