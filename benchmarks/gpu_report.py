"""Targets and the Markdown summary of the GPU suite (benchmarks/gpu_suite.py), computed from its suite.json data
alone (so a merged file from several processes reads as one run)."""

from __future__ import annotations

# Parts in the order they run: value per second of device time (correctness first, the slow-to-compile decode last)
PARTS = {"a": "correctness", "b": "layer", "c": "block", "d": "training", "e": "tiles", "f": "decode"}
H100_EBAG_FWDBWD = {512: 5.3, 768: 13.1, 1024: 18.2}  # MF / Pythia block with F.embedding_bag, earlier H100 run
WORD = {True: "met", False: "not met", None: "not measured"}


def get(data: dict, *keys):
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return data


def _results(data: dict) -> dict:
    return {k: get(data, "parts", k, "results") or {} for k in PARTS}


def targets(data: dict) -> list[dict]:
    def row(name, value, goal, met, stretch=None):
        shown = "n/a" if value is None else value if isinstance(value, str) else f"{value:.2f}x"
        return dict(target=name, value=value, measured=shown, goal=goal, met=met,
                    **({} if stretch is None else dict(stretch=stretch)))

    res = _results(data)
    a = res["a"]
    cases, ops = a.get("cases", []), a.get("opcheck", {})
    checks = [v for u in ops.values() if isinstance(u, dict) for v in u.values()]
    selfc = list(a.get("self_check", {}).values())
    seen = (f"self-check {selfc.count('ok')}/{len(selfc)}, {sum(c.get('ok', False) for c in cases)}/{len(cases)} "
            f"cases, {checks.count('ok')}/{len(checks)} opcheck, compile {get(a, 'compile', 'ok')}") if cases else None
    out = [row("correctness (a): self-check, every case, opcheck and compile check pass", seen, "all pass",
               a.get("all_ok"))]
    blocks = [b for b in res["c"].get("blocks", []) if "fwdbwd" in b]
    big = max(blocks, key=lambda b: b["d"], default=None)
    r = big and big["fwdbwd"]["ratio"]
    out.append(row(f"block fwd+bwd MF / Pythia at d = {big['d'] if big else 1024} (c)", r, "<= 2x (stretch <= 1x)",
                   None if r is None else r <= 2.0, None if r is None else r <= 1.0))
    r = res["d"].get("ratios", {}).get("tiny/pythia-70m")
    out.append(row("MF-tiny training tokens/s / pythia-70m (d)", r, ">= 0.8x", None if r is None else r >= 0.8))
    r = res["f"].get("ratio_vs_dense")
    out.append(row("MF-tiny batch-1 decode / the repo's dense Pythia-70M, same generate() (f)", r, ">= 2x",
                   None if r is None else r >= 2.0))
    return out


def _err(entry: dict) -> str:
    return f"{get(entry, 'error', 'type')}: {(get(entry, 'error', 'message') or '')[:200]}"


def _case_line(c: dict) -> str:
    what = f"- a {c.get('dtype')} {c.get('what', '')}"
    if "errors" not in c:
        return f"{what}: {_err(c)}"
    worst = max(c["errors"], key=lambda k: c["errors"][k]["max"] / c["tol"]["max"])
    return (f"{what}: worst max-wise {c['worst_max']:.2e} (tol {c['tol']['max']:g}), norm-wise {c['worst_norm']:.2e} "
            f"(tol {c['tol']['norm']:g}), non-finite {c['nonfinite']}; worst {worst} -> {'ok' if c['ok'] else 'FAIL'}")


def _figures(res: dict) -> list[str]:
    """One line per measured figure (or error) of each part."""
    out, a, b = [], res["a"], res["b"]
    out += [f"- a self-check {k} (the backend's first-use check against F.embedding_bag): {v}"
            for k, v in a.get("self_check", {}).items()]
    out += [_case_line(c) for c in a.get("cases", [])]
    for op, utils in a.get("opcheck", {}).items():
        bad = {u: v for u, v in utils.items() if v != "ok"} if isinstance(utils, dict) else {"": utils}
        out.append(f"- a opcheck {op}: " + ("ok" if not bad else "; ".join(f"{u} {v[:200]}" for u, v in bad.items())))
    if "compile" in a:
        out.append(f"- a compile: {a['compile']}"[:600])
    for mode in ("fwd", "fwdbwd"):
        m = b.get(mode)
        if m and "ratio" in m:
            out.append(f"- b layer d={b['d']} N={b['n']} {mode}: {m['memory_layer_s'] * 1e6:.0f} us = "
                       f"{m['ratio']:.2f}x F.linear" + (f", {b['row_bytes_per_s'] / 1e12:.2f} TB/s of rows"
                                                        if mode == "fwd" and "row_bytes_per_s" in b else ""))
        elif m:
            out.append(f"- b layer {mode}: {_err(m)}")
    for blk in res["c"].get("blocks", []):
        fb, h100 = blk.get("fwdbwd"), H100_EBAG_FWDBWD.get(blk.get("d"))
        out.append(f"- c block {blk['mf']}: " + (
            f"d={blk['d']}, MF / Pythia fwd {blk['fwd']['ratio']:.2f}x, fwd+bwd {fb['ratio']:.2f}x "
            f"({fb['memoryformer_s'] * 1e3:.2f} / {fb['pythia_s'] * 1e3:.2f} ms)"
            + (f"; with embedding_bag on an H100: {h100}x" if h100 else "") if fb else _err(blk)))
    for name, v in res["d"].get("models", {}).items():
        out.append(f"- d training {name}: " + (f"{v['tokens_per_s']:,.0f} tokens/s, {v['step_s'] * 1e3:.1f} ms/step, "
                   f"peak {v['peak_memory_gb']} GB" if "tokens_per_s" in v else _err(v)))
    e = res["e"]
    if e.get("sweep"):
        out.append(f"- e best tiles {e.get('best_tiles')} (default {e.get('default_tiles')})")
        out += [f"- e {k}: " + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in v.items()) for k, v in e["sweep"].items()]
    out += [f"- e {k}: {v}" for k, v in e.get("errors", {}).items()]
    f = res["f"]
    for k, v in f.get("candidates", {}).items():
        out.append(f"- f decode {k}: " + (f"{v['tokens_per_s']:,.1f} tokens/s (first call {v['first_call_s']:.1f} s)"
                                          if "tokens_per_s" in v else _err(v)))
    if f.get("ratio_vs_hf"):
        out.append(f"- f MF-tiny / Hugging Face GPTNeoX (shown apart: another generate loop): {f['ratio_vs_hf']}")
    return out


def summary(data: dict) -> str:
    m = data["meta"]
    out = [f"# MemoryFormer GPU suite{' (dry run: CPU, Triton interpreter, tiny shapes)' * m['dry_run']}", "",
           f"- device: **{m['device']}**" + (f" ({m['gpu_memory_gb']} GB)" if "gpu_memory_gb" in m else "")
           + f"; torch {m['torch']} (CUDA {m['cuda']}), "
           f"triton {m['triton']}, transformers {m['transformers']}, python {m['python']}",
           f"- {m['date']}; {data.get('elapsed_s')} s in all"]
    out += [f"- process {i + 1}: `{r['command']}` ({r['load_start']} at start; budget {r['time_budget_s']:.0f} s)"
            for i, r in enumerate(data.get("runs", []))]
    out += [f"- CUDA error in part {r['after']}: parts {','.join(r['parts'])} ran in a fresh process"
            + (f" (it exited with {r['rc']})" if r.get("rc") else "") for r in data.get("restarts", [])]
    out += ["", "| target | measured | goal | status |", "|---|---|---|---|"]
    out += [f"| {t['target']} | {t['measured']} | {t['goal']} | {WORD[t['met']]}"
            + (f" (stretch {WORD[t['stretch']]})" if "stretch" in t else "") + " |" for t in data["targets"]]
    out += ["", "| part | status | seconds | error |", "|---|---|---|---|"]
    for k in PARTS:
        p = get(data, "parts", k)
        if p:
            e = p.get("error", {})
            out.append(f"| {k} {p['name']} | {p['status']} | {p.get('seconds', 0):.1f} | "
                       f"{e.get('type', '')} {e.get('message', '')[:150]} |")
    out += ["", "## Figures", ""] + _figures(_results(data))
    if data["skipped"]:
        out += ["", "## Skipped by the time guard", ""]
        out += [f"- {x['what']}: needs ~{x['need_s']} s, {x['left_s']} s left" for x in data["skipped"]]
    left = [k for k in PARTS if get(data, "parts", k, "status") not in ("ok", None)]
    if left:
        out += ["", f"Parts to run again: `--parts {','.join(left)}`"]
    return "\n".join(out) + "\n"
