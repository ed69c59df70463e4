"""Generation: greedy == argmax of full forwards, ragged batches, eos, streaming, constant GLA state."""
import os

import pytest
import torch

import gla
from gla import GLATransformer
from gla.generation import sample_next
from gla.models.state import map_tensors, state_bytes
from gla.ops import decode_step_


def model(**kw):
    torch.manual_seed(0)
    return GLATransformer(64, 32, 2, 64, 2, dropout=0.0, **kw).eval()


@pytest.mark.parametrize("kw", [{}, {"attn_layers": (1,)}])
def test_greedy_equals_argmax_of_full_forwards(kw):
    m = model(**kw)
    ids = torch.randint(0, 64, (2, 7))
    out = gla.generate(m, ids, 12, temperature=0, prefill_chunk=3)
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("kw", [{}, {"attn_layers": (0,)}])
def test_ragged_prompts_equal_one_by_one(kw):
    m = model(**kw)
    prompts = [[5, 9, 2], [7, 1, 1, 3, 8, 2, 4], [11]]
    out = gla.generate(m, prompts, 6, temperature=0)
    for i, p in enumerate(prompts):
        alone = gla.generate(m, torch.tensor([p]), 6, temperature=0)
        assert torch.equal(out[i, -6:], alone[0, -6:])


def test_eos_stops_rows_and_stream_matches_generate():
    m = model()
    ids = torch.randint(0, 64, (3, 4))
    free = gla.generate(m, ids, 10, temperature=0)
    eos = int(free[0, 6])  # the token row 0 produces third
    out = gla.generate(m, ids, 10, temperature=0, eos_token_id=eos)
    row = out[0, 4:]
    first = int((row == eos).nonzero()[0])
    assert torch.all(row[first:] == eos)
    got = []
    streamed = list(gla.stream(m, ids, 10, temperature=0, eos_token_id=eos))
    gla.generate(m, ids, 10, temperature=0, eos_token_id=eos, callback=got.append)
    assert torch.equal(torch.stack(streamed, 1), out[:, 4:]) and len(got) == len(streamed)


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert all(int(sample_next(logits, 1.0, top_k=1, generator=g)) == 1 for _ in range(20))
    assert all(int(sample_next(logits, 1.0, top_p=0.01, generator=g)) == 1 for _ in range(20))
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError):
        sample_next(logits, -1.0)
    with pytest.raises(ValueError):
        sample_next(logits, 1.0, top_p=0.0)


def test_a_tiny_temperature_samples_the_argmax_without_nan():
    """logits / 1e-45 overflowed every logit to +-inf and softmax gave NaN probabilities: shifted to a maximum of
    0 first, the others go to -inf and the largest is drawn."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, -2.0, 0.1, 0.4]])
    for t in (1e-45, 1e-30):
        assert sample_next(logits, t, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]


@pytest.mark.parametrize("kwargs,message", [
    ({"input_ids": [[1, 2, 64]]}, r"token ids must be in \[0, 64\)"),
    ({"input_ids": torch.tensor([[3, -1]])}, r"token ids must be in \[0, 64\)"),
    ({"input_ids": torch.tensor([[1.0, 2.0]])}, "integer token ids"),
    ({"max_new_tokens": -3}, "max_new_tokens must be an int >= 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an int >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_k": 2.5}, "top_k must be an int >= 1"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ({"attention_mask": torch.ones(3)}, "attention_mask must have input_ids' shape"),
    ({"prefill_chunk": -1}, "prefill_chunk must be an int >= 1"),
])
def test_bad_requests_are_clear_errors(kwargs, message):
    """Each of these ended in a traceback from torch (embedding index, multinomial on NaN, range() of a float) or,
    for a negative count, returned the prompt as if all were well."""
    request = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        gla.generate(model(), **request)
    assert gla.generate(model(), torch.tensor([[1, 2, 3]]), 0).tolist() == [[1, 2, 3]]


def decoding_state_bytes(m, monkeypatch, new_tokens: int) -> list[int]:
    """The bytes of the whole state tree (every tensor: recurrent states, conv caches, KV caches, seen, key mask)
    after each model call of generate()'s plain loop (cuda_graph=False: a new state from every call): 3 prefill calls
    for the 10-token prompt, then one per generated token but the last (nothing reads the state after it)."""
    sizes, forward = [], m.forward

    def recording(*args, **kwargs):
        logits, state = forward(*args, **kwargs)
        sizes.append(state_bytes(state))
        return logits, state

    monkeypatch.setattr(m, "forward", recording)
    gla.generate(m, torch.randint(0, 64, (2, 10)), new_tokens, temperature=0, prefill_chunk=4, cuda_graph=False)
    assert len(sizes) == 3 + new_tokens - 1
    return sizes


def test_gla_decoding_state_is_constant_in_the_generated_length(monkeypatch):
    sizes = decoding_state_bytes(model(use_short_conv=True), monkeypatch, 12)
    # per layer: recurrent [B=2, H=2, K=8, V=16] and conv caches [2, C, W-1=3] for C = 16, 16, 32 (q, k, v), float32;
    # seen [2] int64; no key mask
    per_layer = 2 * 2 * 8 * 16 * 4 + 2 * (16 + 16 + 32) * 3 * 4
    assert set(sizes) == {2 * per_layer + 2 * 8}
    # measured the same way, a hybrid's KV cache k, v [B=2, H=2, L, D=16] float32 grows by one token per step
    hybrid = decoding_state_bytes(model(attn_layers=(1,)), monkeypatch, 12)
    assert {b - a for a, b in zip(hybrid[2:], hybrid[3:])} == {2 * 2 * 2 * 16 * 4} and len(hybrid) == 14


def test_logits_to_keep_is_the_last_rows_of_the_full_logits():
    m = model(attn_layers=(1,)).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full, s_full = m(ids)
        last, s_last = m(ids, logits_to_keep=1)
        three, _ = m(ids, logits_to_keep=3)
    # the same rows up to the matmul's blocking (a 1-row product sums in another order than a 9-row one)
    assert last.shape == (2, 1, full.shape[-1]) and torch.allclose(last, full[:, -1:], rtol=1e-5, atol=1e-6)
    assert three.shape == (2, 3, full.shape[-1]) and torch.allclose(three, full[:, -3:], rtol=1e-5, atol=1e-6)
    assert state_bytes(s_full) == state_bytes(s_last)


@pytest.mark.parametrize("kw", [{}, {"use_short_conv": True}, {"attn_layers": (0,), "use_short_conv": True},
                                {"attn_layers": (1,), "attn_kv_heads": 1}, {"backend": "chunk"}],
                         ids=["gla", "conv", "hybrid", "gqa", "chunk-backend"])
def test_static_decoder_steps_equal_the_model_steps(kw, monkeypatch):
    """The in-place step on static buffers (what a CUDA graph replays) gives the eager step's logits and state,
    token after token, and generate() through it gives the same tokens. A softmax layer's static cache holds the
    eager cache's keys in its first slots, the rest masked out; each GLA layer's state is updated in place by
    decode_step_, not returned anew and copied back."""
    import gla.layers.gla_attention as attn
    from gla.decoding import StaticDecoder, kv_capacity
    from gla.layers import KVCache, StaticGLAState
    in_place = []
    monkeypatch.setattr(attn, "decode_step_", lambda *a: in_place.append(a[-1].data_ptr()) or real_step(*a))
    real_step = decode_step_
    m = model(**kw).eval()
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, state = m(ids)
    capacity = kv_capacity(state, 5)
    assert capacity == (256 if "attn_layers" in kw else None)
    dec = StaticDecoder(m, state, capture=False, capacity=capacity)
    buffers = [t.data_ptr() for t in dec.buffers]
    for step in range(5):
        nxt = logits[:, -1].argmax(-1)
        with torch.no_grad():
            logits, state = m(nxt.unsqueeze(1), state)
        got = dec.step(nxt)
        # exact, except where the eager step sums in another order: attention over 256 masked slots instead of the
        # 8 + step keys, or the chunk backend's one-token path instead of the recurrent step
        exact = capacity is None and "backend" not in kw
        if exact:
            assert torch.equal(got, logits[:, -1])
        else:
            torch.testing.assert_close(got, logits[:, -1], rtol=1e-5, atol=1e-6)
        for buf, layer in zip(dec.state.layers, state.layers):
            if isinstance(layer, KVCache):
                L = layer.k.shape[2]
                assert torch.equal(buf.k[:, :, :L], layer.k) and torch.equal(buf.v[:, :, :L], layer.v)
                assert buf.valid[:, :L].all() and not buf.valid[:, L:].any() and int(buf.length) == L
            else:
                for x, y in zip(_flat(buf), _flat(layer), strict=True):  # exact without a softmax layer before
                    torch.testing.assert_close(x, y, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
        assert torch.equal(dec.state.seen, state.seen)
    assert [t.data_ptr() for t in dec.buffers] == buffers  # in place: the same storage every step
    recurrent = [layer.recurrent.data_ptr() for layer in dec.state.layers if isinstance(layer, StaticGLAState)]
    assert len(recurrent) == sum(not isinstance(layer, KVCache) for layer in state.layers)
    assert in_place == recurrent * 5
    a = gla.generate(m, ids, 9, temperature=0, cuda_graph=False)
    assert torch.equal(a, gla.generate(m, ids, 9, temperature=0, cuda_graph=True))


def _flat(x) -> list:
    out = []
    map_tensors(out.append, x)
    return out


def test_static_hybrid_decoding_of_ragged_prompts_and_its_capacity():
    """Left-padded prompts keep their padding masked in the static KV cache: each row's tokens equal generating it
    alone; a decoder refuses to step past its KV capacity with a clear error."""
    from gla.decoding import StaticDecoder
    m = model(attn_layers=(1,)).eval()
    prompts = [[5, 9, 2], [7, 1, 1, 3, 8, 2, 4], [11]]
    out = gla.generate(m, prompts, 6, temperature=0, cuda_graph=True)
    for i, p in enumerate(prompts):
        alone = gla.generate(m, torch.tensor([p]), 6, temperature=0, cuda_graph=False)
        assert torch.equal(out[i, -6:], alone[0, -6:])
    ids = torch.randint(0, 64, (1, 254))
    with torch.no_grad():
        _, state = m(ids)
    dec = StaticDecoder(m, state, capture=False, capacity=256)
    dec.step(ids[:, -1])
    dec.step(ids[:, -1])
    with pytest.raises(ValueError, match="slots are full"):
        dec.step(ids[:, -1])
    with pytest.raises(ValueError, match="KV capacity"):
        StaticDecoder(m, state, capture=False)


@pytest.mark.skipif(os.environ.get("GLA_TEST_GPU") != "1" or not torch.cuda.is_available(),
                    reason="CUDA-graph decoding: GLA_TEST_GPU=1 on a CUDA machine")
@pytest.mark.parametrize("kw", [{}, {"use_short_conv": True}, {"attn_layers": (1,), "attn_kv_heads": 1}],
                         ids=["gla", "conv", "hybrid"])
def test_cuda_graph_decoding_gives_the_eager_tokens(kw):
    """Greedy and sampled (same generator seed) tokens through the captured step equal the eager loop's."""
    m = model(**kw).cuda().eval()
    ids = torch.randint(0, 64, (4, 11), device="cuda")
    for temperature in (0.0, 0.8):
        out = [gla.generate(m, ids, 40, temperature=temperature, cuda_graph=g,
                            generator=torch.Generator(device="cuda").manual_seed(0)) for g in (False, True)]
        assert torch.equal(*out)


def test_static_decoding_reuses_its_buffers():
    """A second request of the same layout reuses the first one's compiled (or captured) decoder, starting from its
    own prompt's state; an uncompiled, uncaptured decoder is built per request."""
    from gla.decoding import decoder_for
    m = model().eval()
    a, b = (torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    with torch.no_grad():
        (_, sa), (_, sb) = m(a), m(b)
    first = decoder_for(m, sa, capture=False, compiled=True)
    first.busy = False  # the first request ends
    again = decoder_for(m, sb, capture=False, compiled=True)
    assert again is first and torch.equal(again.state.layers[1].recurrent, sb.layers[1].recurrent)
    again.busy = False
    assert decoder_for(m, sb, capture=False) is not decoder_for(m, sb, capture=False)
    for ids in (a, b):  # tokens equal the eager loop's for each request in turn
        assert torch.equal(gla.generate(m, ids, 6, temperature=0, cuda_graph=True),
                           gla.generate(m, ids, 6, temperature=0, cuda_graph=False))


def test_compiled_static_step_gives_the_eager_tokens():
    """compile_step: the static decoding step through torch.compile (run uncaptured on a CPU, fp32) gives the eager
    loop's tokens; it needs the static path."""
    m = model(use_short_conv=True).eval()
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(3))
    eager = gla.generate(m, ids, 12, temperature=0, cuda_graph=False)
    assert torch.equal(gla.generate(m, ids, 12, temperature=0, cuda_graph=True, compile_step=True), eager)
    from gla.decoding import _DECODERS
    (decoder,) = _DECODERS[m].values()
    assert decoder.run != decoder._step  # the step that ran was the compiled one
    with pytest.raises(ValueError, match="compile_step"):
        gla.generate(m, ids, 3, temperature=0, cuda_graph=False, compile_step=True)


def test_static_decoding_lets_the_model_go():
    """The decoder cache is keyed weakly by the model and holds it weakly: a model used once is freed with it."""
    import gc
    import weakref
    m = model().eval()
    gla.generate(m, torch.randint(0, 64, (2, 5)), 4, temperature=0, cuda_graph=True)
    alive = weakref.ref(m)
    del m
    gc.collect()
    assert alive() is None


@pytest.fixture
def kept_decoders(monkeypatch):
    """The compiled static step with torch.compile as the identity: decoders are kept and reused per layout, as
    compiled or captured ones are, at eager cost."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


def test_interleaved_streams_each_give_their_own_tokens(kept_decoders):
    """Two streams of one model decoding in turns (two requests of a server, zipped generators) give what each
    gives alone: the second gets a decoder of its own while the first holds the kept one."""
    torch.manual_seed(0)
    m = model().eval()
    a, b = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6))
    kw = dict(temperature=0, compile_step=True)
    alone = [torch.cat(list(gla.stream(m, p, 8, **kw))) for p in (a, b)]
    turns = list(zip(gla.stream(m, a, 8, **kw), gla.stream(m, b, 8, **kw)))
    assert torch.equal(torch.cat([x for x, _ in turns]), alone[0])
    assert torch.equal(torch.cat([y for _, y in turns]), alone[1])


def test_concurrent_requests_each_give_their_own_tokens(kept_decoders):
    """Requests of one layout from several threads (a threaded server): a kept decoder is found free and claimed
    in one step, so no two requests decode on one state; the CPU's few-row linear layers are patched in and out
    once for overlapping requests."""
    import sys
    import threading
    torch.manual_seed(0)
    m = model().eval()
    prompts = [torch.randint(0, 64, (1, 6)) for _ in range(4)]
    kw = dict(temperature=0, compile_step=True)
    want = [gla.generate(m, p, 8, **kw) for p in prompts]
    got, errors = {}, []

    def serve(i):
        try:
            for _ in range(15):
                got.setdefault(i, []).append(gla.generate(m, prompts[i], 8, **kw))
        except Exception as e:  # noqa: BLE001 (reported below, with the thread's prompt)
            errors.append((i, e))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns between almost any two bytecodes: races show
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    assert all(torch.equal(out, want[i]) for i in range(4) for out in got[i])


def test_a_kept_decoder_in_use_is_not_handed_out_again():
    """decoder_for keeps a compiled (or captured) decoder per layout for later requests and claims it for the
    request (busy); while a request holds it, another of the same layout gets a decoder of its own."""
    from gla.decoding import decoder_for

    m = model().eval()
    with torch.no_grad():
        _, state = m(torch.randint(0, 64, (1, 5)))
    first = decoder_for(m, state, capture=False, compiled=True)
    assert first.busy
    other = decoder_for(m, state, capture=False, compiled=True)
    assert other is not first and decoder_for(m, state, capture=False, compiled=False) is not first
    first.busy = False
    assert decoder_for(m, state, capture=False, compiled=True) is first
