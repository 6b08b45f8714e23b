"""`LM.step_slots` against Kyutai's PyTorch `LMModel` (test-only reference, as in test_lm_parity.py): greedy
conversations started at different frames step together, past the context, and each one's tokens equal
its own reference stream's."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from callbot.engine.model.sampling import GREEDY
from callbot.engine.model.weights import load_lm
from tests.tiny_lm import TINY_LM, kyutai_lm_kwargs, write_tiny_lm

os.environ.setdefault("NO_TORCH_COMPILE", "1")
torch = pytest.importorskip("torch")
kyutai_lm = pytest.importorskip("moshi.models.lm")
safetensors_torch = pytest.importorskip("safetensors.torch")

CFG = dataclasses.replace(TINY_LM, context=16)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = write_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), CFG, seed=4)
    return load_lm(path, CFG, progress=False), path


def test_lm_step_slots_matches_kyutai_per_stream(lm):
    """Three greedy conversations started at frames 0, 4 and 11, stepped together for 40 frames (past
    the 16-frame context), each against its own reference LMModel stream: the same tokens."""
    from test_lm_parity import ReferenceGen

    lm, path = lm

    def reference():  # one model per stream: a Kyutai model streams one state at a time
        model = kyutai_lm.LMModel(**kyutai_lm_kwargs(CFG)).eval()
        model.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
        return ReferenceGen(model.float(), CFG)

    starts = [0, 4, 11]
    states = [lm.new_state(GREEDY) for _ in starts]
    refs = []
    rngs = [np.random.default_rng(20 + i) for i in starts]
    compared = 0
    try:
        for t in range(40):
            steps = [i for i, s in enumerate(starts) if t >= s]
            for i in steps:
                if len(refs) <= i:
                    refs.append(reference())
            users = [rngs[i].integers(0, CFG.card, CFG.agent_codebooks) for i in steps]
            got = lm.step_slots([states[i] for i in steps], users)
            for i, user, have in zip(steps, users, got):
                want, _, _ = refs[i].step(user, slices=CFG.agent_codebooks)
                assert (have is None) == (want is None), f"frame {t}, stream {i}"
                if want is not None:
                    assert [have[0]] + have[1].tolist() == want, f"frame {t}, stream {i}"
                    compared += 1
    finally:
        for ref in refs:
            ref.close()
    assert compared == sum(40 - s - 2 for s in starts)
