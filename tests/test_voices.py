"""Voices: the torch-free `.pt` reader, the voice library (voices.tgz / voices/), WAV voices, loudness."""

import io
import tarfile
import wave
import zipfile

import numpy as np
import pytest

from callbot.engine.model.loudness import integrated_loudness, k_weighting_coefficients, normalize_loudness
from callbot.engine.model.ptfile import PtFileError, read_pt
from callbot.engine.model.voices import VOICES, VoiceLibrary, voice_from_pt, voice_from_wav
from callbot.engine.audio.wavfile import read_wav
from tests.tiny_assets import bfloat16_bits_to_float32, float32_to_bfloat16_bits, pt_bytes, voice_tensors, write_voices_tgz


# --- the .pt reader against torch itself ---------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is the test-only reference for the .pt reader")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16", "float64", "int64", "int32", "bool", "uint8"])
def test_reader_equals_torch_load(torch, tmp_path, dtype):
    gen = torch.Generator().manual_seed(1)
    emb = (torch.randn(7, 1, 1, 24, generator=gen) * 3).to(getattr(torch, dtype)) if dtype != "bool" \
        else torch.randn(7, 1, 1, 24, generator=gen) > 0
    cache = torch.randint(0, 2048, (1, 17, 4), generator=gen)
    path = tmp_path / "NATF0.pt"
    torch.save({"embeddings": emb, "cache": cache}, path)
    ours = read_pt(path)
    ref = torch.load(path)
    want = ref["embeddings"].float().numpy() if dtype == "bfloat16" else ref["embeddings"].numpy()
    assert ours["embeddings"].dtype == want.dtype and ours["embeddings"].shape == want.shape
    assert np.array_equal(ours["embeddings"], want)
    assert ours["cache"].dtype == np.int64 and np.array_equal(ours["cache"], ref["cache"].numpy())


def test_library_reads_a_tgz_of_torch_written_voices_as_torch_does(torch, tmp_path):
    """voices.tgz as NVIDIA ships it: voices/<NAME>.pt written by torch.save (bf16 embeddings, int64 ring)."""
    (tmp_path / "src" / "voices").mkdir(parents=True)
    gen = torch.Generator().manual_seed(2)
    for name in VOICES:
        torch.save({"embeddings": torch.randn(6, 1, 1, 32, generator=gen).to(torch.bfloat16),
                    "cache": torch.randint(0, 2049, (1, 17, 4), generator=gen)},
                   tmp_path / "src" / "voices" / f"{name}.pt")
    with tarfile.open(tmp_path / "voices.tgz", "w:gz") as tf:
        tf.add(tmp_path / "src" / "voices", arcname="voices")
    lib = VoiceLibrary(tmp_path)
    assert lib.names() == list(VOICES)
    for name in VOICES:
        ref = torch.load(tmp_path / "src" / "voices" / f"{name}.pt")
        voice = lib.load(name)
        assert np.array_equal(voice.embeddings, ref["embeddings"].float().numpy().reshape(6, 32))
        assert np.array_equal(voice.cache, ref["cache"].numpy()[0])


def test_reader_handles_views_shared_storage_and_nesting(torch, tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = {"t": base.t(), "slice": base[2:5, 3:7], "same": base, "nested": [base[1], (3, "x")], "scalar": 1.5}
    path = tmp_path / "views.pt"
    torch.save(obj, path)
    ours = read_pt(path)
    assert np.array_equal(ours["t"], base.t().numpy())
    assert np.array_equal(ours["slice"], base[2:5, 3:7].numpy())
    assert np.array_equal(ours["nested"][0], base[1].numpy())
    assert ours["nested"][1] == (3, "x") and ours["scalar"] == 1.5


def test_torchless_writer_matches_torch(torch, tmp_path):
    """The test assets' writer (used where torch is absent) produces files torch reads the same way."""
    content = voice_tensors(dim=16, frames=3)
    path = tmp_path / "v.pt"
    path.write_bytes(pt_bytes(content))
    ref = torch.load(path)
    assert np.array_equal(ref["embeddings"].float().numpy(), read_pt(path)["embeddings"])
    assert ref["embeddings"].dtype == torch.bfloat16
    assert np.array_equal(ref["cache"].numpy(), content["cache"][1])


def test_reader_refuses_code_execution(tmp_path):
    # a pickle that would call os.system if unpickled naively
    evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", evil)
        zf.writestr("archive/byteorder", b"little")
    path = tmp_path / "evil.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(PtFileError, match=r"evil\.pt.*refusing to load os\.system"):
        read_pt(path)


@pytest.mark.parametrize("damage", ["truncated", "not_zip", "missing_storage", "short_storage"])
def test_corrupt_pt_names_the_file(tmp_path, damage):
    good = pt_bytes(voice_tensors(dim=8))
    path = tmp_path / "NATM1.pt"
    if damage == "truncated":
        data = good[: len(good) // 2]
    elif damage == "not_zip":
        data = b"\x80\x02}q\x00."
    else:
        src = zipfile.ZipFile(io.BytesIO(good))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for info in src.infolist():
                body = src.read(info)
                if info.filename == "archive/data/0":
                    if damage == "missing_storage":
                        continue
                    body = body[:10]
                zf.writestr(info.filename, body)
        data = buf.getvalue()
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"NATM1\.pt"):
        voice_from_pt(path, name=str(path))


def test_bfloat16_conversion_is_exact_and_rounds_to_nearest_even():
    x = np.array([1.0, -2.5, 3.140625, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 65504.0], dtype=np.float32)
    back = bfloat16_bits_to_float32(float32_to_bfloat16_bits(x))
    assert back.tolist() == [1.0, -2.5, 3.140625, 1.0, 1.0 + 4 * 2**-8, 65536.0]


# --- the voice library -------------------------------------------------------------------------------

def test_library_reads_all_18_voices_from_tgz(tmp_path):
    write_voices_tgz(tmp_path / "voices.tgz", VOICES, dim=12)
    lib = VoiceLibrary(tmp_path)
    assert lib.names() == list(VOICES)
    voices = [lib.load(n) for n in VOICES]
    assert all(v.embeddings.shape == (5, 12) and v.embeddings.dtype == np.float32 for v in voices)
    assert all(v.cache.shape == (17, 4) and v.cache.dtype == np.int64 for v in voices)
    # each voice is its own file, not the same content 18 times
    assert len({v.embeddings.tobytes() for v in voices}) == 18
    want = bfloat16_bits_to_float32(float32_to_bfloat16_bits(voice_tensors(12, seed=3)["embeddings"][1]))
    assert np.array_equal(lib.load(VOICES[3]).embeddings, want.reshape(5, 12))
    assert not (tmp_path / "voices").exists()  # read in memory, nothing extracted


def test_library_prefers_extracted_folder(tmp_path):
    write_voices_tgz(tmp_path / "voices.tgz", ["NATF0"], dim=12)
    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "NATF0.pt").write_bytes(pt_bytes(voice_tensors(12, seed=99)))
    got = VoiceLibrary(tmp_path).load("NATF0")
    want = bfloat16_bits_to_float32(float32_to_bfloat16_bits(voice_tensors(12, seed=99)["embeddings"][1]))
    assert np.array_equal(got.embeddings, want.reshape(5, 12))


def test_unknown_voice_lists_the_18(tmp_path):
    write_voices_tgz(tmp_path / "voices.tgz", VOICES, dim=8)
    with pytest.raises(ValueError, match="unknown voice 'NATF9'.*NATF0, NATF1.*VARM4"):
        VoiceLibrary(tmp_path).load("NATF9")


def test_missing_voices_archive_is_explained(tmp_path):
    with pytest.raises(ValueError, match="voices.tgz"):
        VoiceLibrary(tmp_path).load("NATF0")


@pytest.mark.parametrize("member", ["../evil.pt", "/etc/evil.pt", "voices/../../evil.pt"])
def test_path_traversal_in_tgz_is_rejected(tmp_path, member):
    write_voices_tgz(tmp_path / "voices.tgz", ["NATF0"], dim=8, extra_members={member: b"x"})
    with pytest.raises(ValueError, match="unsafe member"):
        VoiceLibrary(tmp_path).load("NATF0")
    assert not (tmp_path.parent / "evil.pt").exists()


def test_symlink_in_tgz_is_rejected(tmp_path):
    path = tmp_path / "voices.tgz"
    with tarfile.open(path, "w:gz") as tf:
        link = tarfile.TarInfo("voices/NATF0.pt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(ValueError, match="unsafe member 'voices/NATF0.pt' \\(link"):
        VoiceLibrary(tmp_path).load("NATF0")


def test_corrupt_voice_in_tgz_names_the_member(tmp_path):
    write_voices_tgz(tmp_path / "voices.tgz", ["NATF0"], dim=8, extra_members={"voices/NATF1.pt": b"garbage"})
    with pytest.raises(ValueError, match=r"voices\.tgz:voices/NATF1\.pt"):
        VoiceLibrary(tmp_path).load("NATF1")


def test_pt_without_voice_keys_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(pt_bytes({"weights": ("float32", np.zeros(3, np.float32))}))
    with pytest.raises(ValueError, match="expected a dict with 'embeddings' and 'cache'"):
        voice_from_pt(path, name=str(path))


# --- loudness (ITU-R BS.1770-4) ------------------------------------------------------------------------

def test_k_weighting_coefficients_at_48k_match_the_standard():
    # BS.1770-4 tables 1 and 2
    (b1, a1), (b2, a2) = k_weighting_coefficients(48000)
    assert np.allclose(b1, [1.53512485958697, -2.69169618940638, 1.19839281085285], atol=1e-9)
    assert np.allclose(a1, [1.0, -1.69065929318241, 0.73248077421585], atol=1e-9)
    assert np.allclose(b2, [1.0, -2.0, 1.0])
    assert np.allclose(a2, [1.0, -1.99004745483398, 0.99007225036621], atol=1e-9)


def _sine(freq, amplitude, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def test_full_scale_997hz_sine_reads_minus_3_01():
    # BS.1770: a 0 dBFS 997 Hz sine in one front channel reads -3.01 LKFS
    assert integrated_loudness(_sine(997, 1.0, 5, 48000), 48000) == pytest.approx(-3.01, abs=0.01)
    assert integrated_loudness(_sine(997, 0.1, 5, 48000), 48000) == pytest.approx(-23.01, abs=0.01)


def test_gates_drop_quiet_parts():
    rate = 48000
    loud = _sine(1000, 0.1, 10, rate)
    alone = integrated_loudness(loud, rate)
    # 13 dB quieter: above the -70 absolute gate, below the relative gate (10 LU under the mean)
    with_quiet = integrated_loudness(np.concatenate([loud, _sine(1000, 0.1 * 10 ** (-13 / 20), 10, rate)]), rate)
    with_silence = integrated_loudness(np.concatenate([loud, np.zeros(10 * rate)]), rate)
    # (the three 400 ms blocks that straddle the change pass the gates: a few hundredths of a dB)
    assert with_quiet == pytest.approx(alone, abs=0.1)
    assert with_silence == pytest.approx(alone, abs=0.1)
    # ungated, the quiet half would have pulled the mean down by ~2.8 dB
    assert with_quiet > alone - 0.1 > alone - 2.8
    # 5 dB quieter passes both gates and lowers the result
    assert integrated_loudness(np.concatenate([loud, _sine(1000, 0.1 * 10 ** (-5 / 20), 10, rate)]), rate) < alone - 1


def test_normalize_to_minus_24_lufs_at_24k():
    rng = np.random.default_rng(0)
    speechy = rng.standard_normal(24000 * 4) * 0.3 * np.repeat(rng.random(40) > 0.3, 2400)
    out = normalize_loudness(speechy, 24000, -24.0)
    assert out.dtype == np.float32
    assert integrated_loudness(out, 24000) == pytest.approx(-24.0, abs=0.01)


def test_loudness_of_silence_and_short_audio_is_an_error():
    with pytest.raises(ValueError, match="silent"):
        normalize_loudness(np.zeros(24000), 24000)
    with pytest.raises(ValueError, match="shorter than one 400 ms"):
        integrated_loudness(np.ones(100), 24000)


# --- WAV voices --------------------------------------------------------------------------------------

def _write_wav16(path, pcm, rate, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())


def _write_float_wav(path, pcm, rate):
    data = pcm.astype("<f4").tobytes()
    fmt = (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little") \
        + (rate * 4).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)


def test_read_wav_pcm16_stereo_and_float(tmp_path):
    pcm = _sine(440, 0.5, 0.1, 16000)
    _write_wav16(tmp_path / "s.wav", np.stack([pcm, -pcm], axis=1).reshape(-1), 16000, channels=2)
    x, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16000 and x.shape == (2, 1600)
    assert np.allclose(x[0], pcm, atol=2 / 32768) and np.allclose(x[1], -pcm, atol=2 / 32768)
    _write_float_wav(tmp_path / "f.wav", pcm, 16000)
    y, _ = read_wav(tmp_path / "f.wav")
    assert np.array_equal(y[0], pcm.astype(np.float32))


def test_voice_from_wav_is_24k_mono_at_minus_24_lufs(tmp_path):
    rate = 16000
    rng = np.random.default_rng(1)
    pcm = 0.05 * rng.standard_normal(rate * 3)
    _write_wav16(tmp_path / "me.wav", pcm, rate)
    voice = voice_from_wav(tmp_path / "me.wav")
    assert voice.name == "me" and voice.pcm.dtype == np.float32
    assert voice.pcm.shape == (24000 * 3,)
    assert integrated_loudness(voice.pcm, 24000) == pytest.approx(-24.0, abs=0.01)
    assert VoiceLibrary(tmp_path).resolve(tmp_path / "me.wav").pcm.shape == (72000,)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVE", b"not a wav at all"])
def test_bad_wav_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.wav"):
        voice_from_wav(path)


def test_silent_wav_voice_is_refused(tmp_path):
    _write_wav16(tmp_path / "quiet.wav", np.zeros(24000), 24000)
    with pytest.raises(ValueError, match=r"quiet\.wav.*silent"):
        voice_from_wav(tmp_path / "quiet.wav")


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    # a pickle claiming a [4, 4] tensor over a storage of 4 elements: must not read beyond it
    good = pt_bytes({"embeddings": ("float32", np.arange(4, dtype=np.float32)), "cache": ("int64", np.zeros(2, np.int64))})
    src = zipfile.ZipFile(io.BytesIO(good))
    pkl = src.read("archive/data.pkl")
    size_4 = b"(J\x04\x00\x00\x00t"  # the size tuple (4,) as the writer emits it
    assert pkl.count(size_4) == 1
    pkl = pkl.replace(size_4, b"(J\x04\x00\x00\x00J\x04\x00\x00\x00t", 1)
    pkl = pkl.replace(b"(J\x01\x00\x00\x00t", b"(J\x04\x00\x00\x00J\x01\x00\x00\x00t", 1)  # stride (4, 1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info in src.infolist():
            zf.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else src.read(info))
    path = tmp_path / "past.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(PtFileError, match=r"past\.pt: tensor of size \(4, 4\)"):
        read_pt(path)
