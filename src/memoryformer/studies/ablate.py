"""The paper's ablations (Tables 3-6) and the weighting question (Eq. 10's p(z) or the released code's
||z||_1 p(z)), as named suites of configs.

Every variant of a suite is trained with `memoryformer.train.train` on the same data, seed and token budget, then
its validation perplexity is tabulated beside the paper's number, with whether the paper's ordering holds.

    memoryformer ablate --suite expand-bits --scale micro --tokens 300000

Suites (all at the chosen scale's width, heads and layers):
- `tau` (Table 3): tau 4 / 8 / 10. tau = 10 needs d_model divisible by 10 and by n_head, so that variant uses the
  largest such width below d_model (the paper likewise used d = 510 for tau = 10).
- `lr` (Table 4): peak LR 1e-3, 2e-3, 3e-3, 4e-3.
- `expand-bits` (Table 5): 0, 1, 2, 3 expanding bits in the Memory Block.
- `gelu` (Table 6): no activation (paper) vs GeLU between the two Memory Block layers. The paper reports zero-shot
  accuracy for this table, not PPL; at our scale zero-shot is at chance, so we compare validation PPL.
- `weighting` (open question 1): the authors' released weighting ||z||_1 p(z) vs the paper's p(z) (Eq. 10), each at
  temperature 1 and 0.5. The paper reports no numbers for this.
- `attention` (Table 2): the scale's dense control with softmax, Linformer, cosFormer and Performer attention, beside
  the MemoryFormer preset itself. The paper reports zero-shot accuracy of 410M-scale models; we compare validation
  PPL and print each variant's block FLOPs at the paper's s = 2048 as Table 2 does.

A variant whose run folder already holds a finished run of the same config and budget is not retrained.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from memoryformer.config import DENSE_CONTROL, MemoryFormerError, ModelConfig, get_config
from memoryformer.flops import PAPER_SEQ_LEN, block_flops
from memoryformer.integrity import write_text


@dataclass
class Variant:
    name: str
    model: dict = field(default_factory=dict)  # ModelConfig overrides
    train: dict = field(default_factory=dict)  # TrainConfig overrides
    paper: float | None = None  # the paper's number for this variant
    dense: bool = False  # start from the scale's dense control instead of the MemoryFormer preset


# The suites' baseline is the authors' release weighting, as in the committed ablation tables (the library's
# default is the paper's p(z) of Eq. 10); the weighting suite sets its own.
BASELINE = {"weighting": "release"}


def variant_config(scale: str, v: Variant) -> ModelConfig:
    if v.dense:
        return get_config(DENSE_CONTROL[scale], **v.model)
    return get_config(scale, **{**BASELINE, **v.model})


@dataclass
class Suite:
    name: str
    table: str
    metric: str  # what `paper` holds
    variants: list[Variant]
    claim: str  # the paper's ordering, in words
    paper_models: str = "MF-tiny"  # what the paper's numbers were measured on


def _tau10_width(cfg: ModelConfig) -> int:
    step = math.lcm(10, cfg.n_head)
    return max(step, cfg.d_model // step * step)


def suites(scale: str = "micro") -> dict[str, Suite]:
    base = get_config(scale, **BASELINE)
    if base.arch != "memoryformer":
        raise MemoryFormerError(f"scale: {scale!r} is a dense preset; ablations need a MemoryFormer preset")
    return {
        "tau": Suite("tau", "Table 3", "val PPL", [
            Variant("tau=4", dict(tau=4), paper=19.01),
            Variant("tau=8", dict(tau=8), paper=18.82),
            Variant(f"tau=10 (d={_tau10_width(base)})", dict(tau=10, d_model=_tau10_width(base)), paper=18.67),
        ], "PPL falls as tau grows (4 > 8 > 10)"),
        "lr": Suite("lr", "Table 4", "val PPL", [
            Variant(f"lr={lr:g}", train=dict(lr=lr), paper=p)
            for lr, p in ((1e-3, 19.86), (2e-3, 19.07), (3e-3, 18.82), (4e-3, 18.84))
        ], "3x the dense LR (3e-3) is best; 1e-3 is clearly worst"),
        "expand-bits": Suite("expand-bits", "Table 5", "val PPL", [
            Variant(f"bits={b}", dict(expand_bits=b), paper=p)
            for b, p in ((0, 19.89), (1, 19.26), (2, 18.82), (3, 18.54))
        ], "PPL falls with every extra bit (0 > 1 > 2 > 3)"),
        "gelu": Suite("gelu", "Table 6", "zero-shot avg", [
            Variant("no activation", dict(block_activation=None), paper=0.404),
            Variant("GeLU", dict(block_activation="gelu"), paper=0.402),
        ], "a GeLU in the Memory Block does not help (0.404 vs 0.402 zero-shot avg)"),
        "weighting": Suite("weighting", "open question 1", "-", [
            Variant("release, t=1", dict(weighting="release", temperature=1.0)),
            Variant("paper, t=1", dict(weighting="paper", temperature=1.0)),
            Variant("paper, t=0.5", dict(weighting="paper", temperature=0.5)),
            Variant("release, t=0.5", dict(weighting="release", temperature=0.5)),
        ], "no paper numbers: which weighting trains better is open"),
        "attention": Suite("attention", "Table 2", "zero-shot avg", [
            Variant("dense, softmax", dense=True, paper=0.435),
            Variant("dense, Linformer", dict(attention="linformer"), dense=True, paper=0.398),
            Variant("dense, cosFormer", dict(attention="cosformer"), dense=True, paper=0.405),
            Variant("dense, Performer", dict(attention="performer"), dense=True, paper=0.418),
            Variant("MemoryFormer", paper=0.458),
        ], "MemoryFormer beats all three efficient attentions and the dense model (0.458 vs 0.398-0.435 avg)",
            "Pythia-410M / MF-base"),
    }


SUITE_NAMES = ("tau", "lr", "expand-bits", "gelu", "weighting", "attention")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=.-" else "_" for c in name).strip("_")


def run_suite(suite_name: str, *, scale: str = "micro", tokens: int = 300_000, out: str | os.PathLike = "runs/ablations",
              seed: int = 0, batch_size: int = 16, eval_tokens: int = 65_536, data: str | None = None,
              device: str = "cpu", progress: bool = True, log=print, results_dir: str | os.PathLike | None = None,
              only: list[str] | None = None) -> dict:
    """Train every variant of a suite at equal tokens; returns {"suite", ..., "variants": [{name, val_ppl, ...}]}.

    A variant is not trained again when a finished run of the same model and training config exists anywhere under
    OUT/<scale>/ (the suites share their baseline: tau 8, 2 bits, LR 3e-3, no GeLU, release weighting at t = 1).
    `only`: train just these variants (the table still lists every variant already finished).
    `results_dir`: rewrite the markdown/JSON tables there after every variant, marked incomplete until all are
    done, so a long suite stopped early still leaves its finished variants tabulated.
    """
    from memoryformer.train import TrainConfig, train

    all_suites = suites(scale)
    if suite_name not in all_suites:
        raise MemoryFormerError(f"suite: unknown suite {suite_name!r} (valid: {', '.join(SUITE_NAMES)}, all)")
    if tokens < 1:
        raise MemoryFormerError(f"tokens: expected a positive number, got {tokens}")
    suite = all_suites[suite_name]
    names = [v.name for v in suite.variants]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise MemoryFormerError(f"only: no variant {unknown[0]!r} in suite {suite.name} (variants: {', '.join(names)})")
    scale_root = Path(out) / scale
    results: dict[str, dict] = {}

    def result() -> dict:
        rows = [results[n] for n in names if n in results]
        return dict(suite=suite.name, table=suite.table, paper_metric=suite.metric, paper_models=suite.paper_models,
                    claim=suite.claim, scale=scale,
                    tokens_per_variant=tokens, batch_size=batch_size, seed=seed, data=data or "sample",
                    eval_tokens=eval_tokens, complete=len(rows) == len(names), variants_total=len(names), variants=rows,
                    ordering=ordering(suite, rows))

    for v in suite.variants:
        cfg = variant_config(scale, v)
        tkw = dict(data=data, out=str(scale_root / suite.name / _slug(v.name)), max_tokens=tokens, seed=seed,
                   batch_size=batch_size, eval_every=0, eval_tokens=eval_tokens, ckpt_every=0, device=device,
                   progress=progress, verbose=False, deterministic=False)
        tkw.update(v.train)
        tcfg = TrainConfig(**tkw)
        s = _finished(Path(tcfg.out), cfg, tcfg) or _find_equivalent(scale_root, cfg, tcfg)
        if s is not None:
            log(f"[{suite.name}] {v.name}: reusing the finished run in {s['_dir']}")
        elif only is None or v.name in only:
            log(f"[{suite.name}] training {v.name}: {tokens:,} tokens -> {tcfg.out}")
            t0 = time.time()
            s = train(cfg, tcfg)
            s["wall_s"] = round(time.time() - t0, 1)
            write_text(Path(tcfg.out, "ablation.json"),
                       json.dumps({"model": cfg.to_dict(), "train": tcfg.to_dict()}, indent=1) + "\n")
            log(f"[{suite.name}] {v.name}: val ppl {s.get('val_ppl'):.3f} ({s.get('tokens'):,} tokens, "
                f"{s.get('tokens_per_s', 0):,.0f} tokens/s)")
        else:
            continue
        results[v.name] = dict(name=v.name, model_overrides=v.model, train_overrides=v.train, paper=v.paper,
                               val_loss=s.get("val_loss"), val_ppl=s.get("val_ppl"), tokens=s.get("tokens"),
                               steps=s.get("steps"), tokens_per_s=s.get("tokens_per_s"),
                               checkpoint=s.get("checkpoint"), params=s.get("params"),
                               block_flops=block_flops(cfg, PAPER_SEQ_LEN))
        if results_dir is not None:
            write_results(result(), results_dir)
    return result()


def _comparable(cfg: ModelConfig, tcfg) -> tuple[dict, dict]:
    from memoryformer.train import default_lr

    t = {k: v for k, v in tcfg.to_dict().items() if k not in ("out", "progress", "verbose")}
    t["lr"] = t["lr"] if t["lr"] is not None else default_lr(cfg)  # an explicit default LR is the same run
    return cfg.to_dict(), t


def _finished(run_dir: Path, cfg: ModelConfig, tcfg) -> dict | None:
    """The summary of the finished run in `run_dir` if it trained exactly this config, else None."""
    summary_path, meta = run_dir / "summary.json", run_dir / "ablation.json"
    if not (summary_path.is_file() and meta.is_file()):
        return None
    try:
        s, m = json.loads(summary_path.read_text()), json.loads(meta.read_text())
        theirs = _comparable(ModelConfig.from_dict(m["model"]), _train_config(m["train"]))
    except (OSError, json.JSONDecodeError, KeyError, MemoryFormerError):
        return None
    if s.get("stopped_by") != "done" or theirs != _comparable(cfg, tcfg):
        return None
    s["_dir"] = str(run_dir)
    return s


def _train_config(d: dict):
    from memoryformer.train import TrainConfig

    return TrainConfig(**d)


def _find_equivalent(scale_root: Path, cfg: ModelConfig, tcfg) -> dict | None:
    for meta in sorted(scale_root.glob("*/*/ablation.json")):
        s = _finished(meta.parent, cfg, tcfg)
        if s is not None:
            return s
    return None


def ordering(suite: Suite, rows: list[dict]) -> dict:
    """Does our PPL order the variants as the paper's numbers do? Pairwise agreement and the best variant."""
    ours = {r["name"]: r["val_ppl"] for r in rows if r["val_ppl"] is not None}
    paper = {r["name"]: r["paper"] for r in rows if r["paper"] is not None}
    names = [n for n in ours if n in paper]
    out: dict = {"best_ours": min(ours, key=ours.get) if ours else None}
    if len(names) < 2 or suite.metric == "-":
        out["holds"] = None
        return out
    lower_better = suite.metric != "zero-shot avg"
    sign = 1 if lower_better else -1
    pairs = agree = 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if paper[a] == paper[b]:
                continue
            pairs += 1
            # our metric is always PPL (lower is better)
            agree += (ours[a] < ours[b]) == (sign * paper[a] < sign * paper[b])
    best_paper = (min if lower_better else max)(names, key=lambda n: paper[n])
    out.update(best_paper=best_paper, pairs_agree=agree, pairs=pairs, holds=agree == pairs)
    return out


def format_markdown(res: dict) -> str:
    trained = sorted({r["tokens"] for r in res["variants"] if r.get("tokens")})
    paper_head = "paper" if res["paper_metric"] == "-" else f"paper ({res['paper_metric']}, {res.get('paper_models', 'MF-tiny')})"
    lines = [
        f"### {res['table']}: `{res['suite']}` at `{res['scale']}` scale",
        "",
        f"Each variant: {', '.join(f'{t:,}' for t in trained) or res['tokens_per_variant']} training tokens "
        f"({res['tokens_per_variant']:,} asked, rounded up to whole batches of {res['batch_size']} sequences), "
        f"seed {res['seed']}, data `{res['data']}`, validation PPL over the same {res['eval_tokens']:,} tokens of "
        "held-out text for every variant.",
        "",
        f"| variant | {paper_head} | ours: val PPL | ours: val loss | block FLOPs (s=2048) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["variants"]:
        paper = "-" if r["paper"] is None else f"{r['paper']:g}"
        fl = "-" if r.get("block_flops") is None else f"{r['block_flops'] / 1e9:.3g} G"
        lines.append(f"| {r['name']} | {paper} | {r['val_ppl']:.3f} | {r['val_loss']:.4f} | {fl} | "
                     f"{r['tokens_per_s'] or 0:,.0f} |")
    o = res["ordering"]
    if not res.get("complete", True):
        lines += ["", f"**Incomplete:** {len(res['variants'])} of the suite's {res.get('variants_total', '?')} variants "
                      "finished in the time available."]
    lines += ["", "block FLOPs: multiply-accumulates of one block's forward over 2,048 tokens, counted as the paper's "
                  "Table 1 (memoryformer flops).",
              "tokens/s: training throughput as measured; it depends on what else ran on the machine, not only "
                  "on the variant.", "", f"Paper's claim: {res['claim']}."]
    if o.get("holds") is None:
        lines.append(f"Best here: {o['best_ours']}.")
    else:
        lines.append(
            f"Ordering: {o['pairs_agree']}/{o['pairs']} variant pairs ordered as in the paper; best here "
            f"{o['best_ours']!r} (paper: {o['best_paper']!r}) -> the paper's ordering "
            f"{'holds' if o['holds'] else 'does not fully hold'} at this scale."
        )
    return "\n".join(lines) + "\n"


def write_results(res: dict, results_dir: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"ablations_{res['suite'].replace('-', '_')}_{res['scale']}"
    md, js = d / f"{stem}.md", d / f"{stem}.json"
    write_text(md, format_markdown(res))
    write_text(js, json.dumps(res, indent=1) + "\n")
    return md, js
