"""Slot engines and the continuous-batching scheduler (no HTTP): every row of a batch of mixed lengths, with slots
freed and refilled on the way, equals its request decoded alone; the eager model is the reference."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

import memoryformer as mf
from memoryformer.generate import generate
from memoryformer.inference import DecodeEngine
from memoryformer.serve import BatchedSlots, EagerSlots, QueueFull, SamplingParams, Scheduler, ShuttingDown
from memoryformer.serve.engine import slot_engine_for
from memoryformer.serve.metrics import Histogram

needs_ext = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
SHAPE = {"n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 48, "vocab_size": 300}
PROMPTS = [[5, 17, 3], list(range(40, 61)), [7], [250, 1, 2, 3, 4, 5, 6, 7, 8]]
NEW = [12, 5, 20, 9]  # tokens each row decodes: rows finish at different steps and free their slots


def build(arch="memoryformer", seed=0):
    torch.manual_seed(seed)
    return mf.build_model(mf.get_config("micro" if arch == "memoryformer" else "micro-dense", **SHAPE)).eval()


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    ck = tmp_path_factory.mktemp("serve") / "ck"
    mf.save_model(build(), ck)
    return mf.load(ck, tables="int8")


def run_batched(engine, prompts, new, max_batch):
    """Greedy decoding of every prompt through `engine`'s slots, at most `max_batch` at once: a finished row frees
    its slot and the next prompt takes it while the others go on. Returns each row's tokens and logits."""
    todo = list(range(len(prompts)))
    rows, out, logits = {}, [[] for _ in prompts], [[] for _ in prompts]  # rows: slot -> (request, last token)
    free = list(range(max_batch))
    while todo or rows:
        while todo and free:
            i, s = todo.pop(0), free.pop(0)
            lg = engine.add(s, prompts[i])
            rows[s] = i
            logits[i].append(lg)
            out[i].append(int(lg.argmax()))
        for s in [s for s, i in rows.items() if len(out[i]) == new[i]]:
            engine.free(s)
            free.append(s)
            del rows[s]
        if not rows:
            continue
        slots = list(rows)
        lgs = engine.step(slots, [out[rows[s]][-1] for s in slots])
        for s, lg in zip(slots, lgs):
            out[rows[s]].append(int(lg.argmax()))
            logits[rows[s]].append(lg)
    return out, logits


@pytest.mark.parametrize("arch", ["memoryformer", "transformer"])
def test_eager_slots_rows_equal_each_request_alone(arch):
    model = build(arch)
    engine = slot_engine_for(model, 2)
    assert isinstance(engine, EagerSlots)  # an unfrozen or dense model: the eager fallback
    got, _ = run_batched(engine, PROMPTS, NEW, max_batch=2)
    for p, n, toks in zip(PROMPTS, NEW, got):
        alone = generate(model, torch.tensor([p]), n, temperature=0, engine=False)[0, len(p):].tolist()
        assert toks == alone


@needs_ext
@pytest.mark.parametrize("max_batch", [1, 3, 4])
def test_batched_slots_rows_equal_alone_and_the_eager_reference(frozen, max_batch):
    engine = slot_engine_for(frozen, max_batch)
    assert isinstance(engine, BatchedSlots)  # frozen int8 tables: every slot a row of one compiled engine
    got, logits = run_batched(engine, PROMPTS, NEW, max_batch=max_batch)
    for i, (p, n, toks) in enumerate(zip(PROMPTS, NEW, got)):
        # bit for bit the request decoded alone: a row's numbers do not depend on the rows beside it
        alone = DecodeEngine(frozen, batch_size=1)
        lg = [alone.prefill(torch.tensor([p]))[0]]
        for t in toks[:-1]:
            lg.append(alone.step(torch.tensor([t]))[0])
        assert toks == [int(x.argmax()) for x in lg]
        assert torch.equal(torch.stack(logits[i]), torch.stack(lg))
    # the eager model is the reference: with a float32 cache the engine's logits are the eager model's
    exact = BatchedSlots(frozen, max_batch, kv_dtype=torch.float32)
    toks, logits = run_batched(exact, PROMPTS, NEW, max_batch=max_batch)
    ref_toks, ref_logits = run_batched(EagerSlots(frozen, max_batch), PROMPTS, NEW, max_batch=max_batch)
    assert toks == ref_toks
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(torch.stack(a), torch.stack(b), atol=1e-4, rtol=1e-4)


@needs_ext
def test_batched_slots_prompt_chunks_beside_decode_rows(frozen):
    # a long prompt fed in chunks of 5, each chunk in the same call as the other rows' next tokens, ends where
    # its whole prefill does; the rows beside it are not disturbed (more tokens than one pass of the engine holds)
    engine, ref = BatchedSlots(frozen, 3), BatchedSlots(frozen, 3)
    long = [(7 * i) % 300 for i in range(45)]
    a = engine.add(0, PROMPTS[0])
    assert torch.equal(a, ref.add(0, PROMPTS[0]))
    tok, got = int(a.argmax()), []
    for c in range(0, len(long), 5):
        out = engine.run([(0, [tok], True), (2, long[c:c + 5], c + 5 >= len(long))])
        assert out.shape == (1 if c + 5 < len(long) else 2, 300)
        step = ref.step([0], [tok])[0]
        assert torch.equal(out[0], step)
        tok = int(step.argmax())
        got = out
    assert torch.equal(got[1], ref.add(2, long)) and engine.length(2) == 45 == ref.length(2)
    p1, p2 = list(range(1, 47)), list(range(2, 42))  # 86 tokens: two passes of the engine's 64
    both = BatchedSlots(frozen, 2).run([(1, p1, True), (0, p2, True)])
    assert torch.equal(both[0], BatchedSlots(frozen, 1).add(0, p1))
    assert torch.equal(both[1], BatchedSlots(frozen, 1).add(0, p2))


def test_slot_engine_refuses_misuse():
    engine = EagerSlots(build(), 2)
    with pytest.raises(ValueError, match="slot: 0 is free"):
        engine.step([0], [1])
    engine.add(0, [1, 2])
    with pytest.raises(ValueError, match="slot: 0 is in use"):
        engine.add(0, [3])
    with pytest.raises(ValueError, match=r"slot: expected an integer in \[0, 2\)"):
        engine.add(2, [3])
    with pytest.raises(ValueError, match="ids: token ids must lie in"):
        engine.step([0], [300])
    with pytest.raises(ValueError, match="max_seq_len: 49 positions"):
        engine.add(1, list(range(49)))
    assert engine.length(0) == 2 and engine.step([], []).shape == (0, 300)
    engine.free(0)
    assert engine.length(0) == 0
    with pytest.raises(ValueError, match="engine: the decode engine cannot run"):
        slot_engine_for(build("transformer"), 2, engine=True)


# -- the scheduler ---------------------------------------------------------------------------------------------


def chars(ids):  # a decoder for the toy vocabulary: one letter per token
    return "".join(chr(97 + t % 26) for t in ids)


class Gated(EagerSlots):
    """Eager slots whose steps wait for `gate` (to hold requests in their slots while a test looks)."""

    def __init__(self, model, max_batch):
        super().__init__(model, max_batch)
        self.gate = threading.Event()

    def run(self, feeds):
        if any(self._active[f[0]] for f in feeds):  # a step of running rows (not a first prefill)
            assert self.gate.wait(10)
        return super().run(feeds)


def test_scheduler_batches_mixed_requests_like_alone():
    model = build()
    params = [SamplingParams(max_tokens=n, temperature=0) for n in NEW]
    params[1] = SamplingParams(max_tokens=NEW[1], temperature=0.9, top_k=50, top_p=0.9, seed=7)  # seeded sampling
    alone = []
    with_one = Scheduler(EagerSlots(model, 1), decode=chars).start()
    for p, sp in zip(PROMPTS, params):
        alone.append(with_one.submit(p, sp).result())
    with_one.shutdown()
    sched = Scheduler(EagerSlots(model, 3), decode=chars).start()  # 4 requests over 3 slots: one waits its turn
    handles = [sched.submit(p, sp) for p, sp in zip(PROMPTS, params)]
    assert [h.result() for h in handles] == alone
    greedy = [generate(model, torch.tensor([p]), n, temperature=0, engine=False)[0, len(p):].tolist()
              for p, n in zip(PROMPTS, NEW)]
    assert alone[0][0] == chars(greedy[0]) and alone[0][1] == "length"
    assert alone[0][2] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    sched.shutdown()
    assert sched.metrics.generated_tokens == sum(NEW) and sched.metrics.finished == {"length": 4}


@needs_ext
@pytest.mark.parametrize("prefill_chunk", [0, 4])
def test_scheduler_on_the_batched_engine_like_alone(frozen, prefill_chunk):
    # chunked prefill (4 prompt tokens a step beside the running rows) or whole prompts between steps: the same
    # text as each request alone, greedy and seeded
    params = [SamplingParams(max_tokens=n, temperature=0) for n in NEW]
    params[2] = SamplingParams(max_tokens=NEW[2], temperature=0.8, top_p=0.95, seed=3)
    with_one = Scheduler(BatchedSlots(frozen, 1), decode=chars).start()
    alone = [with_one.submit(p, sp).result() for p, sp in zip(PROMPTS, params)]
    with_one.shutdown()
    sched = Scheduler(BatchedSlots(frozen, 3), decode=chars, prefill_chunk=prefill_chunk).start()
    handles = [sched.submit(p, sp) for p, sp in zip(PROMPTS, params)]
    assert [h.result() for h in handles] == alone
    sched.shutdown()
    assert sched.metrics.generated_tokens == sum(NEW) and sched.metrics.prompt_tokens == sum(map(len, PROMPTS))


def test_stop_tokens_stop_strings_and_the_context():
    model = build()
    sched = Scheduler(EagerSlots(model, 2), decode=chars, eos_id=None).start()
    ids = generate(model, torch.tensor([PROMPTS[0]]), 30, temperature=0, engine=False)[0, 3:].tolist()
    text = chars(ids)
    # a stop token: the text ends before it, the token counts as generated
    k = ids.index(ids[4])
    got, reason, usage = sched.submit(PROMPTS[0], SamplingParams(30, 0, stop_token_ids=(ids[4],))).result()
    assert (got, reason, usage["completion_tokens"]) == (text[:k], "stop", k + 1)
    # a stop string of three letters: the text ends before it, whichever tokens it straddles
    stop = text[7:10]
    got, reason, _ = sched.submit(PROMPTS[0], SamplingParams(30, 0, stop=("zzzz", stop))).result()
    assert (got, reason) == (text[: text.find(stop)], "stop")
    # streamed: the pieces add up to the same text, and no piece ever showed a part of the stop string
    pieces = [ev.text for ev in sched.submit(PROMPTS[0], SamplingParams(30, 0, stop=(stop,)))]
    assert "".join(pieces) == text[: text.find(stop)]
    # the context: a row stops when prompt + tokens fill the slot (48 here), whatever max_tokens says
    got, reason, usage = sched.submit(list(range(40)), SamplingParams(100, 0)).result()
    assert reason == "length" and usage["completion_tokens"] == 8 and usage["total_tokens"] == 48
    with pytest.raises(ValueError, match="prompt: 48 tokens leave no room"):
        sched.submit(list(range(48)), SamplingParams())
    sched.shutdown()


def test_queue_bound_cancellation_and_drain():
    engine = Gated(build(), 1)
    sched = Scheduler(engine, max_queue=1, decode=chars).start()
    first = sched.submit([1, 2, 3], SamplingParams(max_tokens=40, temperature=0))
    deadline = time.time() + 5
    while sched.active == 0 and time.time() < deadline:
        time.sleep(0.01)
    queued = sched.submit([4, 5], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(QueueFull, match="max_queue=1"):
        sched.submit([6], SamplingParams())
    assert (sched.active, sched.queue_depth) == (1, 1)
    first.cancel()  # frees the slot at the next boundary: the queued request takes it
    engine.gate.set()
    assert first.result()[1] == "cancelled" and queued.result()[1] == "length"
    assert sched.active == 0 and sched.metrics.rejected == 1
    # drain: stop admitting, finish what is in flight, then cancel what is left at the deadline
    engine.gate.clear()
    slow = sched.submit([1], SamplingParams(max_tokens=40, temperature=0))
    waiting = sched.submit([2], SamplingParams(max_tokens=40, temperature=0))
    threading.Timer(0.2, engine.gate.set).start()
    sched.shutdown(deadline=0.1)
    assert slow.done and waiting.done and slow.finish_reason == "cancelled"
    with pytest.raises(ShuttingDown):
        sched.submit([1], SamplingParams())


def test_sampling_params_name_the_bad_field():
    for kw, field in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                      ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"), ({"seed": -1}, "seed"),
                      ({"stop": ("",)}, "stop"), ({"stop_token_ids": (-1,)}, "stop_token_ids")]:
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            SamplingParams(**kw)


def test_histogram_is_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 1', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4',
                            "x_sum 4.05", "x_count 4"]


def test_one_failing_request_never_stops_the_loop():
    calls = {"n": 0}

    def flaky(ids):  # the decoder fails on its first call only: outside the engine, inside a step
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("decoder broke")
        return chars(ids)

    sched = Scheduler(EagerSlots(build(), 2), decode=flaky).start()
    with pytest.raises(RuntimeError, match="internal error: RuntimeError: decoder broke"):
        sched.submit(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0)).result()
    assert sched.alive and sched.active == 0
    text, reason, _ = sched.submit(PROMPTS[1], SamplingParams(max_tokens=3, temperature=0)).result()
    assert reason == "length" and len(text) == 3
    sched.shutdown()
    assert not sched.alive


def test_a_seed_a_generator_cannot_take_is_refused():
    from memoryformer.serve.protocol import parse_completion

    with pytest.raises(Exception, match=r"seed: expected an integer >= 0 and <= 9223372036854775807"):
        parse_completion({"prompt": [1], "max_tokens": 2, "seed": 2**70}, encode=lambda s: [1], vocab_size=300,
                         max_seq_len=48)
