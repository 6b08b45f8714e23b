"""The MLX LM against Kyutai's PyTorch `LMModel` (test-only reference) with the same tiny checkpoint.

The reference loads the NVIDIA-layout `model.safetensors` with strict=True and is driven by hand
through `forward_text` / `forward_depformer` with NVIDIA LMGen's delayed-stream rules (Kyutai's own
`LMGen` ignores the user's audio when dep_q=16): user codebooks forced into streams 9-16, prompts
forcing the agent's streams, greedy decoding so both sides must pick the same tokens.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from callbot.engine.model.lm_config import LmConfig
from callbot.engine.model.sampling import GREEDY
from callbot.engine.model.weights import load_lm

from tests.tiny_lm import TINY_LM, kyutai_lm_kwargs, write_tiny_lm

# Kyutai's helpers torch.compile themselves on first use unless told not to: seconds per call on a CPU.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
torch = pytest.importorskip("torch")
kyutai_lm = pytest.importorskip("moshi.models.lm")
safetensors_torch = pytest.importorskip("safetensors.torch")

ATOL = 1e-4  # float32 logits of magnitude ~1-10 after a few layers


class ReferenceGen:
    """NVIDIA LMGen's token bookkeeping, written out plainly on top of Kyutai's LMModel (greedy)."""

    def __init__(self, model, cfg: LmConfig):
        self.model, self.cfg = model, cfg
        self.ring = cfg.max_delay + 3
        self.cache = np.full((cfg.num_streams, self.ring), -2, dtype=np.int64)
        self.provided = np.zeros_like(self.cache, dtype=bool)
        self.initial = np.array([cfg.text_card] + [cfg.card] * cfg.n_q)
        self.offset = 0
        self._stream = model.streaming(1)
        self._stream.__enter__()

    def close(self):
        self._stream.__exit__(None, None, None)

    def _write(self, stream, token):
        pos = (self.offset + self.cfg.delays[stream]) % self.ring
        self.cache[stream, pos] = token
        self.provided[stream, pos] = True

    @torch.no_grad()
    def step(self, user=None, agent=None, text=None, embedding=None, slices=None):
        """One frame; `slices` limits the depformer to its first slices (all by default)."""
        cfg, n = self.cfg, self.cfg.agent_codebooks
        slices = cfg.dep_q if slices is None else slices
        if user is not None:
            for q in range(n):
                self._write(1 + n + q, user[q])
        if agent is not None:
            for q in range(n):
                self._write(1 + q, agent[q])
        if text is not None:
            self._write(0, text)
        for k, delay in enumerate(cfg.delays):
            if self.offset <= delay:
                self.cache[k, self.offset % self.ring] = self.initial[k]
                self.provided[k, self.offset % self.ring] = True
        if self.offset == 0:
            self.cache[:, 0] = self.initial
            self.offset = 1
            return None, None, None
        inp_pos, tgt_pos = (self.offset - 1) % self.ring, self.offset % self.ring
        target, provided = self.cache[:, tgt_pos].copy(), self.provided[:, tgt_pos].copy()
        m = self.model
        if embedding is None:
            seq = torch.from_numpy(self.cache[:, inp_pos].reshape(1, -1, 1))
            out, text_logits = m.forward_text(seq)
        else:
            out = m.out_norm(m.transformer(torch.from_numpy(embedding.reshape(1, 1, -1))))
            text_logits = m.text_linear(out)[:, None]
        text_logits = text_logits[0, 0, 0].numpy()
        text_token = int(text_logits.argmax())
        prev = int(target[0]) if provided[0] else text_token
        audio_logits, audio_tokens = [], []
        assert provided[1 + slices:cfg.dep_q + 1].all(), "only forced slices may be skipped"
        with m.depformer.streaming(1):
            for k in range(slices):
                logits = m.forward_depformer(k, torch.tensor([[[prev]]]), out)[0, 0, 0].numpy()
                token = int(logits.argmax())
                audio_logits.append(logits)
                audio_tokens.append(token)
                prev = int(target[1 + k]) if provided[1 + k] else token
        self.provided[:, inp_pos] = False
        if not self.provided[0, tgt_pos]:
            self.cache[0, tgt_pos] = text_token
        for k in range(slices):
            if not self.provided[1 + k, tgt_pos]:
                self.cache[1 + k, tgt_pos] = audio_tokens[k]
        o = self.offset
        self.offset += 1
        frame = None
        if o > cfg.max_delay:
            frame = [int(self.cache[k, (o - cfg.max_delay + cfg.delays[k]) % self.ring]) for k in range(n + 1)]
        audio = np.stack(audio_logits) if audio_logits else np.zeros((0, cfg.card), np.float32)
        return frame, text_logits, audio


def _reference(cfg: LmConfig, path):
    model = kyutai_lm.LMModel(**kyutai_lm_kwargs(cfg)).eval()
    model.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    return model.float()


def _check_step(ours, ref, i):
    (out, logits), (ref_frame, ref_text, ref_audio) = ours, ref
    if ref_text is None:
        assert out is None and logits is None, f"step {i}"
        return
    np.testing.assert_allclose(logits.text, ref_text, atol=ATOL, rtol=0, err_msg=f"text logits, step {i}")
    np.testing.assert_allclose(logits.audio, ref_audio[:len(logits.audio)], atol=ATOL, rtol=0,
                               err_msg=f"depformer logits, step {i}")
    if ref_frame is None:
        assert out is None, f"step {i}"
    else:
        assert out is not None, f"step {i}"
        assert [out[0]] + out[1].tolist() == ref_frame, f"tokens, step {i}"


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """The tiny checkpoint stored in bfloat16, like the real one (loaded as float32 on this CPU)."""
    return write_tiny_lm(tmp_path_factory.mktemp("tiny_lm_bf16"), bf16=True)


def test_prompted_then_live_steps_match_kyutai(tiny_bf16):
    """52 frames: 8 voice-prompt-like (agent audio forced, text PAD), 4 text-prompt-like (text forced),
    then 40 live frames where only the user's codebooks are forced. All 16 slices compared."""
    cfg = TINY_LM
    ref = ReferenceGen(_reference(cfg, tiny_bf16), cfg)
    lm = load_lm(tiny_bf16, cfg, progress=False)
    state = lm.new_state(GREEDY)
    rng = np.random.default_rng(7)
    live = 0
    try:
        for i in range(52):
            user = rng.integers(0, cfg.card, cfg.agent_codebooks)
            agent = rng.integers(0, cfg.card, cfg.agent_codebooks) if i < 12 else None
            text = (cfg.text_padding_token if i < 8 else int(rng.integers(0, cfg.text_card))) if i < 12 else None
            got = lm.step_with_logits(state, user, agent_codes=agent, text_token=text)
            _check_step(got, ref.step(user, agent, text), i)
            live += got[0] is not None and i >= 12
    finally:
        ref.close()
    assert live == 40
    assert state.offset == 52


def test_live_step_runs_only_agent_slices_and_agrees(tiny_bf16):
    """`step` (agent slices only) gives the same frames as the reference running all 16 slices."""
    cfg = TINY_LM
    ref = ReferenceGen(_reference(cfg, tiny_bf16), cfg)
    lm = load_lm(tiny_bf16, cfg, progress=False)
    state = lm.new_state(GREEDY)
    rng = np.random.default_rng(8)
    try:
        for i in range(30):
            user = rng.integers(0, cfg.card, cfg.agent_codebooks)
            out, logits = lm.step_with_logits(state, user, all_slices=False)
            ref_frame, ref_text, ref_audio = ref.step(user, slices=cfg.agent_codebooks)
            if logits is not None:  # slices past the last agent codebook are never run
                assert logits.audio.shape[0] <= cfg.agent_codebooks
            _check_step((out, logits), (ref_frame, ref_text, ref_audio), i)
    finally:
        ref.close()


def test_voice_prompt_embeddings_replay_like_nvidia(tiny_bf16):
    """A saved voice prompt replays embeddings frame by frame, then its token ring is loaded."""
    cfg = TINY_LM
    ref = ReferenceGen(_reference(cfg, tiny_bf16), cfg)
    lm = load_lm(tiny_bf16, cfg, progress=False)
    state = lm.new_state(GREEDY)
    rng = np.random.default_rng(9)
    initial = [cfg.card] * cfg.agent_codebooks
    try:
        for i in range(6):
            emb = rng.standard_normal(cfg.dim).astype(np.float32)
            if ref.offset == 0:
                ref.step(initial, initial, cfg.text_padding_token)
            ref.step(initial, initial, cfg.text_padding_token, embedding=emb)
            lm.step_embedding(state, emb)
        assert state.offset == ref.offset == 7
        saved = rng.integers(0, cfg.card, (1, cfg.num_streams, cfg.max_delay + 3))
        ref.cache[:] = saved[0]
        state.set_stream_tokens(saved)
        np.testing.assert_array_equal(state.provided, ref.provided)
        for i in range(10):
            user = rng.integers(0, cfg.card, cfg.agent_codebooks)
            _check_step(lm.step_with_logits(state, user), ref.step(user), i)
    finally:
        ref.close()


def test_rotating_cache_matches_a_16_frame_window_for_500_frames(tmp_path):
    """Context 16, 500 frames (31 times the context): the text logits still equal Kyutai's, whose
    streaming cache attends exactly the last 16 frames; then the depformer is checked too."""
    cfg = dataclasses.replace(TINY_LM, context=16)
    path = write_tiny_lm(tmp_path, cfg, seed=3)
    ref = ReferenceGen(_reference(cfg, path), cfg)
    lm = load_lm(path, cfg, progress=False)
    state = lm.new_state(GREEDY)
    rng = np.random.default_rng(10)
    n = cfg.agent_codebooks
    try:
        for i in range(500):
            user = rng.integers(0, cfg.card, n)
            if i < 495:  # every stream forced: only the temporal transformer runs (as in a prompt)
                agent, text = rng.integers(0, cfg.card, n), int(rng.integers(0, cfg.text_card))
                got = lm.step_with_logits(state, user, agent_codes=agent, text_token=text, all_slices=False)
                assert got[1] is None or got[1].audio.shape == (0, cfg.card)
            else:
                agent = text = None
                got = lm.step_with_logits(state, user)
            _check_step(got, ref.step(user, agent, text, slices=0 if i < 495 else None), i)
    finally:
        ref.close()
    assert state.cache.offset == 499 and state.cache.layers[0].capacity == 16
