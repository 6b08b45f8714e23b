"""Streaming convolutions and SEANet against Kyutai's PyTorch `moshi` (test-only reference)."""

import numpy as np
import pytest

import mlx.core as mx

from callbot.engine.model.conv import ConvState, ConvTransposeState, StreamingConv1d, StreamingConvTranspose1d
from callbot.engine.model.seanet import SeanetConfig, SeanetDecoder, SeanetEncoder, SeanetState

torch = pytest.importorskip("torch")
moshi_conv = pytest.importorskip("moshi.modules.conv")
moshi_seanet = pytest.importorskip("moshi.modules.seanet")

from callbot.engine.model.mimi import convert_conv_weight, convert_convtr_weight, seanet_layer_paths  # noqa: E402


def to_nlc(x):
    return mx.array(x.detach().numpy().transpose(0, 2, 1))


def to_ncl(y):
    return np.array(y).transpose(0, 2, 1)


def copy_conv(ours, theirs):
    ours.weight = mx.array(convert_conv_weight(theirs.weight.detach().numpy()))
    if theirs.bias is not None:
        ours.bias = mx.array(theirs.bias.detach().numpy())


def run_chunks(layer, x, chunk, fresh):
    state, outs = fresh, []
    for start in range(0, x.shape[1], chunk):
        y, state = layer.step(x[:, start : start + chunk], state)
        outs.append(y)
    return mx.concatenate(outs, axis=1)


@pytest.mark.parametrize("kernel,stride,dilation,pad_mode", [
    (1, 1, 1, "constant"), (3, 1, 2, "constant"), (7, 1, 1, "constant"),
    (8, 4, 1, "constant"), (16, 8, 1, "constant"), (4, 2, 1, "replicate"), (3, 3, 1, "replicate"),
])
def test_conv1d_matches_reference_whole_and_streamed(kernel, stride, dilation, pad_mode):
    torch.manual_seed(kernel * 100 + stride)
    ref = moshi_conv.StreamingConv1d(6, 5, kernel, stride, dilation=dilation, causal=True, pad_mode=pad_mode)
    ours = StreamingConv1d(6, 5, kernel, stride, dilation=dilation, pad_mode=pad_mode)
    copy_conv(ours, ref.conv.conv)
    x = torch.randn(2, 6, stride * 12)
    with torch.no_grad():
        expected = ref(x).numpy()
    whole, _ = ours.step(to_nlc(x), ConvState())
    np.testing.assert_allclose(to_ncl(whole), expected, atol=1e-5, rtol=1e-5)
    streamed = run_chunks(ours, to_nlc(x), stride * 3, ConvState())
    np.testing.assert_allclose(np.array(streamed), np.array(whole), atol=1e-6, rtol=1e-6)


def test_conv1d_rejects_a_step_that_is_not_a_multiple_of_the_stride():
    layer = StreamingConv1d(2, 2, 8, stride=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        layer.step(mx.zeros((1, 6, 2)), ConvState())


@pytest.mark.parametrize("kernel,stride,groups", [
    (4, 2, 1), (16, 8, 1), (10, 5, 1), (5, 2, 1), (3, 3, 1), (4, 2, 6), (4, 2, 2)])
def test_convtranspose1d_matches_reference_whole_and_streamed(kernel, stride, groups):
    torch.manual_seed(kernel + stride + groups)
    ref = moshi_conv.StreamingConvTranspose1d(6, 6, kernel, stride, groups=groups, causal=True)
    with torch.no_grad():
        ref.convtr.convtr.bias.normal_()
    ours = StreamingConvTranspose1d(6, 6, kernel, stride, groups=groups)
    ours.weight = mx.array(convert_convtr_weight(ref.convtr.convtr.weight.detach().numpy(), groups))
    ours.bias = mx.array(ref.convtr.convtr.bias.detach().numpy())
    x = torch.randn(2, 6, 9)
    with torch.no_grad():
        expected = ref(x).numpy()
    whole, _ = ours.step(to_nlc(x), ConvTransposeState())
    np.testing.assert_allclose(to_ncl(whole), expected, atol=1e-5, rtol=1e-5)
    streamed = run_chunks(ours, to_nlc(x), 1, ConvTransposeState())
    np.testing.assert_allclose(np.array(streamed), np.array(whole), atol=1e-6, rtol=1e-6)


SMALL_SEANET = dict(channels=1, dimension=16, n_filters=4, n_residual_layers=1, ratios=[4, 3, 2],
                    kernel_size=7, residual_kernel_size=3, last_kernel_size=3, dilation_base=2,
                    compress=2, pad_mode="constant", causal=True, true_skip=True, norm="none")


def seanet_config(**changes):
    kw = dict(SMALL_SEANET, **changes)
    for key in ("causal", "true_skip", "norm"):
        kw.pop(key)
    kw["ratios"] = tuple(kw["ratios"])
    return SeanetConfig(**kw)


def copy_seanet(ours, ref, prefix):
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    for path, _, layer in seanet_layer_paths(ours, prefix):
        for name in ("weight", "bias"):
            value = state[f"{path}.{name}"]
            if name == "weight":
                is_tr = path.endswith(".convtr")
                value = convert_convtr_weight(value, 1) if is_tr else convert_conv_weight(value)
            setattr(layer, name, mx.array(value))


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("changes", [{}, {"n_residual_layers": 2, "compress": 4, "pad_mode": "replicate"}])
def test_seanet_encoder_and_decoder_match_reference(changes):
    torch.manual_seed(3)
    kw = dict(SMALL_SEANET, **changes)
    ref_enc, ref_dec = moshi_seanet.SEANetEncoder(**kw), moshi_seanet.SEANetDecoder(**kw)
    randomize(ref_enc)
    randomize(ref_dec)
    cfg = seanet_config(**changes)
    enc, dec = SeanetEncoder(cfg), SeanetDecoder(cfg)
    copy_seanet(enc, ref_enc, "model")
    copy_seanet(dec, ref_dec, "model")
    hop = cfg.hop_length
    audio = torch.randn(1, 1, hop * 10)
    latent = torch.randn(1, 16, 10)
    with torch.no_grad():
        expected_latent = ref_enc(audio).numpy()
        expected_audio = ref_dec(latent).numpy()
    got_latent, _ = enc.step(to_nlc(audio), SeanetState())
    got_audio, _ = dec.step(to_nlc(latent), SeanetState())
    np.testing.assert_allclose(to_ncl(got_latent), expected_latent, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(to_ncl(got_audio), expected_audio, atol=1e-4, rtol=1e-4)
    streamed_latent = run_chunks(enc, to_nlc(audio), hop * 2, SeanetState())
    streamed_audio = run_chunks(dec, to_nlc(latent), 2, SeanetState())
    np.testing.assert_allclose(np.array(streamed_latent), np.array(got_latent), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(streamed_audio), np.array(got_audio), atol=1e-5, rtol=1e-5)
