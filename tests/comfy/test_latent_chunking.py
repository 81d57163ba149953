"""Latent-batch chunking of MemoRa's model calls (nodes/_host.py): ComfyUI splits cond from uncond by its memory
estimate but never the latent batch; the pack splits the latent batch by the same estimate, and the results are the
same as in one call."""

from __future__ import annotations

import pytest
import torch

from random_loras import pack_module

STEPS, START = 8, 3


@pytest.fixture(scope="module")
def setup(loaded_tiny):
    model, clip, _vae = loaded_tiny
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of the parachute"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    x0 = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(7)) / 0.18215
    calls: list[int] = []
    m = model.clone()

    def wrapper(apply_model, args):
        calls.append(int(args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    return m, pos, neg, x0, calls


def _regenerate(setup, max_latents=None):
    model, pos, neg, x0, calls = setup
    host, ddim = pack_module("nodes._host"), pack_module("memora.ddim")
    sigmas = host.sampling_sigmas(model, STEPS)[START:]
    calls.clear()
    with torch.inference_mode():
        out = host.run_algorithm(model, pos, neg, 3.0, x0, sigmas, lambda eps, x: ddim.regenerate(eps, x, sigmas),
                                 max_latents_per_call=max_latents)
    return out, list(calls)


def test_chunked_calls_give_the_unchunked_result(setup):
    whole, calls_whole = _regenerate(setup)
    k = STEPS - START
    assert calls_whole == [10] * k  # 5 latents x (cond, uncond) in one call per step
    chunked, calls_chunked = _regenerate(setup, max_latents=2)
    assert calls_chunked == [4, 4, 2] * k  # equal chunks of at most 2: (2, 2, 1) latents, each with its CFG pair
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)


def test_latents_per_call_follows_comfyui_memory_estimate(setup):
    model = setup[0]
    host = pack_module("nodes._host")
    base = model.model
    x = torch.zeros(33, 4, 64, 64)
    one = base.memory_required([1, 4, 64, 64]) * 1.5
    whole = base.memory_required([33, 4, 64, 64]) * 1.5
    assert whole == pytest.approx(33 * one)  # ComfyUI's estimate is linear in the batch
    assert host.latents_per_call(base, x, free_memory=int(whole) + 1) == 33
    assert host.latents_per_call(base, x, free_memory=int(10.5 * one)) == 10
    assert host.latents_per_call(base, x, free_memory=int(0.2 * one)) == 1  # never below one latent
    assert host.latents_per_call(base, x[:1], free_memory=0) == 1
    assert host._even_chunks(33, 10) == [(0, 9), (9, 18), (18, 27), (27, 33)]
    assert host._even_chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
