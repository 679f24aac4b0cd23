"""Zero-shot scorer and perplexity: lm-eval's prompts and tokenization, the shared-context fast path, metrics, CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import memoryformer as mf
from memoryformer import evaluate as ev
from memoryformer.cli import main as cli_main
from memoryformer.data import eval_starts
from memoryformer.evaluate import scoring


@pytest.fixture(scope="module")
def tok():
    return ev.get_tokenizer()


# -- prompts -------------------------------------------------------------------------------------------------------


def test_prompts_follow_lm_eval_task_definitions(bench):
    piqa = ev.load_docs("piqa", bench)[0]
    assert piqa.pairs == [("Question: How do I dry wet shoes?\nAnswer:", " Stuff them with newspaper."),
                          ("Question: How do I dry wet shoes?\nAnswer:", " Put them in the freezer.")]
    assert piqa.gold == 0 and piqa.choices == ["Stuff them with newspaper.", "Put them in the freezer."]

    arc = ev.load_docs("arc_easy", bench)
    assert arc[0].gold == 1 and arc[1].gold == 0 and len(arc[1].pairs) == 3  # numeric answer keys, 3 choices
    assert arc[0].pairs[1] == ("Question: Which is a liquid?\nAnswer:", " water")

    lq = ev.load_docs("logiqa", bench)[0]
    assert lq.pairs[0][0] == ("Passage: All cats are animals. Tom is a cat.\nQuestion: Which follows?\nChoices:\n"
                              "A. Tom is a dog\nB. Tom is a plant\nC. Tom is an animal\nD. Nothing follows\nAnswer:")
    assert lq.gold == 2 and lq.pairs[2][1] == " Tom is an animal"

    wsc = ev.load_docs("wsc", bench)[0]
    assert wsc.pairs[0][0] == (
        "Passage: Mark told Pete many lies about himself, which Pete included in his book. *He* should have been "
        "more skeptical.\nQuestion: In the passage above, does the pronoun \"*He*\" refer to \"*Mark*\"?\nAnswer:")
    assert [p[1] for p in wsc.pairs] == [" no", " yes"] and wsc.gold == 0

    wg = ev.load_docs("winogrande", bench)[1]
    assert wg.pairs == [("Anna helped Maria because Anna", " needed help."), ("Anna helped Maria because Maria", " needed help.")]
    assert wg.gold == 1

    lam = ev.load_docs("lambada_openai", bench)[1]
    assert lam.pairs[0][1] == " hill" and lam.pairs[0][0].endswith("behind the")


def test_tasks_aliases_limit_and_unknown_task(bench):
    assert ev.parse_tasks(None) == list(ev.PAPER_TASKS)
    assert ev.parse_tasks("lambada,piqa,piqa") == ["lambada_openai", "piqa"]
    assert ev.parse_tasks("all") == list(ev.ALL_TASKS)
    with pytest.raises(mf.MemoryFormerError, match="unknown task 'hellaswag'.*piqa, winogrande, wsc"):
        ev.parse_tasks("piqa,hellaswag")
    assert len(ev.load_docs("piqa", bench, limit=1)) == 1
    with pytest.raises(mf.MemoryFormerError, match="not a folder"):
        ev.load_docs("piqa", bench / "missing")
    with pytest.raises(mf.MemoryFormerError, match="benchmark file .* not found"):
        ev.load_docs("piqa", bench.parent)


def test_encode_pair_follows_lm_eval(tok, vocab_model):
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    ctx, cont = ev.encode_pair(tok, "Question: hi\nAnswer: ", "yes")  # trailing space moves to the continuation
    assert ctx == enc("Question: hi\nAnswer:") and cont == enc("Question: hi\nAnswer: yes")[len(ctx):]
    assert ev.encode_pair(tok, "", " hello") == ([0], enc(" hello"))  # empty context -> <|endoftext|>
    # the continuation is the joint encoding past the context's length, not its own encoding: where BPE merges
    # across the boundary ("split" + "s" -> "splits") it comes out empty, and scores 0 as in lm-eval
    c, k = ev.encode_pair(tok, "a tricky split", "s")
    assert c == enc("a tricky split") and k == enc("a tricky splits")[len(c):] == []
    model = vocab_model(max_seq_len=16)
    assert ev.loglikelihood_groups(model, [(c, [k, enc(" x")])], progress=False)[0][0] == (0.0, True)


# -- scoring -------------------------------------------------------------------------------------------------------


def _reference_scores(model, groups):
    """One full forward per (context, continuation), lm-eval's truncation: the definition being sped up."""
    L = model.config.max_seq_len
    out = []
    with torch.no_grad():
        for ctx, conts in groups:
            res = []
            for c in conts:
                full = (ctx + c)[-(L + 1):]
                logits, _ = model(torch.tensor([full[:-1]]))
                lp = F.log_softmax(logits[0].float(), -1)
                pos = range(len(full) - 1 - len(c), len(full) - 1)
                res.append((sum(lp[p, full[p + 1]].item() for p in pos),
                            all(int(logits[0, p].argmax()) == full[p + 1] for p in pos)))
            out.append(res)
    return out


@pytest.mark.parametrize("arch,kw", [("memoryformer", {}), ("transformer", {}), ("transformer", {"attention": "cosformer"})])
def test_batched_shared_context_scores_equal_full_forward(arch, kw, monkeypatch):
    monkeypatch.setattr(scoring, "HEAD_ROWS", 3)  # LM-head chunks end inside groups and inside shared prefixes
    torch.manual_seed(0)
    extra = {"tau": 4} if arch == "memoryformer" else {}
    cfg = mf.get_config("micro" if arch == "memoryformer" else "micro-dense", n_layer=2, d_model=32, n_head=2,
                        max_seq_len=24, vocab_size=97, **extra, **kw)
    model = mf.build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    rnd = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    groups = []
    for i in range(12):
        ctx = torch.randint(0, 97, (rnd(1, 30 if i % 4 == 0 else 15),), generator=g).tolist()  # some overflow the window
        conts = [torch.randint(0, 97, (rnd(1, 7),), generator=g).tolist() for _ in range(rnd(1, 5))]
        groups.append((ctx, conts))
    # choices that start alike: their common prefix is scored once, the targets after it each on their own
    groups += [([3, 1, 4], [[5, 9, 2], [5, 9, 7, 1], [5, 8], [5]]), ([2, 7], [[1, 8, 2, 8], [1, 8, 2, 8, 1]])]
    got = ev.loglikelihood_groups(model, groups, batch_size=5, progress=False)
    want = _reference_scores(model, groups)
    for gs, ws in zip(got, want):
        for (a, ga), (b, gb) in zip(gs, ws):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_greedy_flag_is_true_for_the_models_own_argmax(vocab_model):
    model = vocab_model(vocab_size=97, max_seq_len=16, d_model=16, tau=4)
    ctx = [5, 6, 7]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx]))[0][0, -1].argmax())
    (best, other), = ev.loglikelihood_groups(model, [(ctx, [[nxt], [(nxt + 1) % 97]])], progress=False)
    assert best[1] and not other[1] and best[0] > other[0]


def test_metrics_acc_norm_divides_by_characters():
    docs = [ev.Doc([("q", " a"), ("q", " bbbbbbbbbb")], 1, ["a", "bbbbbbbbbb"])]
    scores = [[(-2.0, False), (-5.0, False)]]  # raw: choice 0 wins; per character: -2/1 < -5/10, choice 1 wins
    m = scoring._metrics("piqa", docs, scores)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert scoring._metrics("wsc", docs, scores)["acc_norm"] is None  # lm-eval reports acc only for wsc / winogrande
    ties = scoring._metrics("arc_easy", [ev.Doc([("q", " x"), ("q", " y")], 0, ["x", "y"])], [[(-1.0, 0), (-1.0, 0)]])
    assert ties["acc"] == 1.0  # argmax takes the first of equal scores, as numpy


def test_evaluate_tasks_end_to_end(bench, vocab_model):
    model = vocab_model()
    res = ev.evaluate_tasks(model, "all", data_dir=bench, progress=False)
    assert list(res) == list(ev.ALL_TASKS)
    for task, r in res.items():
        assert r["n"] == 3 and 0.0 <= r["acc"] <= 1.0
        assert (r["acc_norm"] is not None) == ("acc_norm" in ev.TASKS[task].metrics)
    assert res["lambada_openai"]["ppl"] > 1.0
    # lambada ppl is exp(-mean log-likelihood of the last word)
    docs = ev.load_docs("lambada_openai", bench)
    lls = ev.loglikelihood(model, ev.get_tokenizer(), [d.pairs[0] for d in docs], progress=False)
    assert res["lambada_openai"]["ppl"] == pytest.approx(math.exp(-sum(x for x, _ in lls) / 3), rel=1e-5)
    assert not model.training


def test_perplexity_matches_cross_entropy(tmp_path, tok, vocab_model):
    path = tmp_path / "t.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    model = vocab_model(max_seq_len=32)
    r = ev.perplexity(model, str(path), seq_len=16, batch_size=3, progress=False)
    ids = tok.encode(path.read_text(), add_special_tokens=False).ids + [0]
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 16, 16):  # every whole window of 17 tokens, consecutive
            w = torch.tensor(ids[s : s + 17])
            logits, _ = model(w[None, :-1])
            nll += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
            n += 16
    assert r["tokens"] == n == (len(ids) - 1) // 16 * 16 and r["windows"] == n // 16
    assert r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    capped = ev.perplexity(model, str(path), max_tokens=64, progress=False)  # 2 windows of 32, spread over the text
    assert capped["tokens"] == 64 and capped["windows"] == 2 and capped["seq_len"] == 32
    assert list(eval_starts(len(ids), 32, 64)) == [0, len(ids) - 33]
    with pytest.raises(mf.MemoryFormerError, match="no such file"):
        ev.perplexity(model, str(tmp_path / "nope.txt"), progress=False)


def test_cli_eval_json_and_errors(bench, tmp_path, capsys, vocab_model):
    ck = mf.save_model(vocab_model(), tmp_path / "ck")
    cli_main(["eval", "--checkpoint", str(ck), "--tasks", "piqa,wsc,lambada", "--data-dir", str(bench),
              "--limit", "1", "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"piqa", "wsc", "lambada_openai"}
    assert set(out["piqa"]) == {"acc", "acc_norm", "n"} and out["piqa"]["n"] == 1
    text = tmp_path / "x.txt"
    text.write_text("Some text to score. " * 30, encoding="utf-8")
    cli_main(["eval", "--checkpoint", str(ck), "--data", str(text), "--max-tokens", "128", "--seq-len", "32", "--json",
              "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"ppl", "nll", "tokens", "windows", "seq_len"} and out["tokens"] == 128 and out["windows"] == 4
    # int8 tables: nearly the same perplexity, not the same bits
    cli_main(["eval", "--checkpoint", str(ck), "--data", str(text), "--max-tokens", "128", "--seq-len", "32", "--json",
              "--no-progress", "--tables", "int8"])
    q = json.loads(capsys.readouterr().out)
    assert q["tokens"] == 128 and q["ppl"] == pytest.approx(out["ppl"], rel=0.02) and q["ppl"] != out["ppl"]
    for argv, msg in ((["--tasks", "nope"], "unknown task 'nope'"),
                      (["--data-dir", str(tmp_path / "none")], "not a folder")):
        with pytest.raises(SystemExit) as e:
            cli_main(["eval", "--checkpoint", str(ck), *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err
