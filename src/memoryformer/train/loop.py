"""The training loop: set a run up (or restore it), then step, evaluate, log and checkpoint until it ends.

- The global batch (`batch_size` sequences) is drawn by one seeded sampler and split over ranks and
  gradient-accumulation micro-steps, so any world size sees the same tokens in the same step.
- bf16 autocast with fp32 master weights on CUDA; fp32 on CPU.
- `OUT/metrics.jsonl`: one JSON object per logged step; `OUT/ckpt-<step>/`, `OUT/final/`: atomic, self-contained
  checkpoints; resuming continues bit for bit (CPU, `deterministic=True`).
- A step whose loss or gradient norm is not finite changes nothing (no optimizer step; its data is consumed) and is
  logged as skipped; `max_skipped_steps` of them in a row stop the run. One process writes a run folder at a time
  (`integrity.RunLock`), and it first removes the temporaries an interrupted writer left there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from memoryformer import checkpoint as ckpt_io
from memoryformer.config import ConfigError, MemoryFormerError, ModelConfig, TrainConfig
from memoryformer.evaluate.perplexity import window_nll
from memoryformer.integrity import (
    RunLock,
    append_line,
    check_apart,
    read_jsonl,
    refuse_link,
    remove_stale_temps,
    replace_file,
    write_text,
)
from memoryformer.train import distributed as dist_mod
from memoryformer.train.distributed import all_reduce, barrier
from memoryformer.train.recipe import lr_at
from memoryformer.train.run import RESUME_FIXED, LogWindow, Run, autocast, batch, resume_config, setup, summary_writer


def train(model_cfg: ModelConfig | None, tcfg: TrainConfig, *, resume: str | os.PathLike | None = None) -> dict:
    """Train `model_cfg` as `tcfg` says (or continue the run at `resume`) and return a summary.

    Returns {"out", "checkpoint", "steps", "total_steps", "tokens", "elapsed_s", "tokens_per_s", "train_loss",
    "val_loss", "val_ppl", "params", "stopped_by"}, where "stopped_by" is "done", "time_budget", "stop_after" or
    "interrupt". Under torchrun every rank calls this; all return the same summary.
    """
    resume_path = None
    if resume is not None:
        fixed = {k: getattr(tcfg, k) for k in RESUME_FIXED}
        model_cfg, _, resume_path = resume_config(resume, model_cfg, verify=tcfg.verify, **fixed)
    if model_cfg is None:
        raise ConfigError("model_cfg: a ModelConfig is needed unless resuming")
    seq_len = tcfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len: {seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    check_apart(tcfg.out, {"--data": tcfg.data, "--val-data": tcfg.val_data})  # the run folder is no input
    rt = dist_mod.setup_runtime(tcfg.device, tcfg.fsdp)
    prev_det = torch.are_deterministic_algorithms_enabled()
    try:
        with writer_lock(tcfg.out, rt):
            run = setup(model_cfg, tcfg, rt, seq_len, resume_path)
            if run.step >= run.total:
                return already_complete(run, resume_path)
            open_outputs(run, resume_path)
            return finish(run, loop(run))
    finally:
        torch.use_deterministic_algorithms(prev_det)
        dist_mod.teardown(rt)


@contextlib.contextmanager
def writer_lock(out: str, rt):
    """Rank 0 holds the run folder's lock for the whole run and first clears what an interrupted writer left."""
    if not rt.is_main:
        yield
        return
    with RunLock(out):
        remove_stale_temps(out)
        yield


def already_complete(run: Run, resume_path: Path | None) -> dict:
    if run.rt.is_main and run.tcfg.verbose:
        print(f"{resume_path}: the run is already complete ({run.step} of {run.total} steps); "
              "pass a larger --max-steps or --max-tokens to continue it")
    return summary(run, str(resume_path), run.last.get("val_loss"), "done")


RUN_FILES = ("metrics.jsonl", "config.json", "train_config.json", "summary.json", "final", "tensorboard")


def open_outputs(run: Run, resume_path: Path | None) -> None:
    """The run folder, metrics.jsonl (cut back to the resumed step), TensorBoard, and the run header."""
    out, metrics = run.out, run.out / "metrics.jsonl"
    if run.rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for entry in (*RUN_FILES, *(p.name for p in out.glob("ckpt-*"))):  # before anything is written
            refuse_link(out / entry, entry)
        if resume_path is None and metrics.exists():
            if ckpt_io.list_checkpoints(out):
                raise ckpt_io.CheckpointError(
                    f"{out}: already holds a training run; use --resume {out} to continue it or pick a new --out")
            metrics.unlink()
        if resume_path is not None and metrics.exists():
            keep = [rec for rec in read_jsonl(metrics) if rec.get("step", 0) <= run.step]
            write_text(metrics, "".join(json.dumps(rec) + "\n" for rec in keep))
        write_text(out / "train_config.json", json.dumps(run.tcfg.to_dict(), indent=1) + "\n")
        replace_file(out / "config.json", run.cfg.save)
        if run.tcfg.tensorboard:
            run.tb = summary_writer()(str(out / "tensorboard"))
    if run.rt.is_main and run.tcfg.verbose:
        print(header(run, resume_path), flush=True)


def header(run: Run, resume_path: Path | None) -> str:
    n, c, t = run.bare.num_params(), run.cfg, run.tcfg
    return (f"memoryformer train: {c.arch} {c.n_layer}x{c.d_model} ({n['dense'] / 1e6:.2f} M dense + "
            f"{n['table'] / 1e6:.2f} M table parameters) on {run.rt.device}"
            f"{f' x {run.rt.world} ranks' if run.rt.world > 1 else ''}\n"
            f"  data {t.data or 'sample'}: {len(run.train_tok):,} train / {len(run.val_tok):,} val tokens; "
            f"{t.batch_size} x {run.seq_len} = {run.tokens_per_step:,} tokens/step (micro-batch {run.micro}, "
            f"accumulation {run.accum})\n"
            f"  peak LR {run.peak_lr:g}, {run.total:,} steps = {run.total * run.tokens_per_step:,} tokens"
            + (f", resuming at step {run.step} from {resume_path}" if resume_path else "") + f"\n  output {run.out}")


# ---------------------------------------------------------------------------------------------------------------
# Steps, evaluation, checkpoints


def train_step(run: Run) -> tuple[float, float, float, bool]:
    """One optimizer step over the next global batch: (mean loss, gradient norm before clipping, LR, stepped).

    A non-finite loss or gradient norm (on any rank) skips the optimizer step: the parameters and the optimizer
    state stay as they were, the batch's data is consumed all the same, and `stepped` is False.
    """
    lr = lr_at(run.step, run.total, run.peak_lr, run.tcfg.warmup_frac, run.tcfg.min_lr_ratio)
    for g in run.opt.param_groups:
        g["lr"] = lr
    starts = run.sampler.next(run.tcfg.batch_size)
    loss_sum = torch.zeros((), device=run.rt.device)
    sharded = run.tcfg.fsdp
    for a in range(run.accum):
        x = batch(run, starts, a)
        sync = a == run.accum - 1
        if sharded:
            run.model.set_requires_gradient_sync(sync)
        no_sync = run.rt.world > 1 and not sharded and not sync
        with run.model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(run.rt.device, run.tcfg.precision):
                _, loss = run.model(x[:, :-1], x[:, 1:])
            (loss / run.accum).backward()
        loss_sum += loss.detach()
    clip = run.tcfg.grad_clip if run.tcfg.grad_clip > 0 else float("inf")
    gnorm = run.opt.clip_grad_norm_(clip)  # sparse table rows included (memoryformer.optim)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    bad = (~torch.stack([loss_sum, gnorm.to(loss_sum)]).isfinite().all()).float()
    bad = all_reduce(bad, run.rt, "max")  # every rank skips, or none
    stepped = not bool(bad.item())
    if stepped:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return loss_sum.item() / run.accum, float(gnorm), lr, stepped


def evaluate(run: Run) -> float:
    """Mean next-token cross-entropy (nats) over the fixed validation windows, split over ranks."""
    model = run.model if run.tcfg.fsdp else run.bare
    mine = run.val_starts[run.rt.rank :: run.rt.world]
    nll, n = window_nll(model, run.val_tok, mine, run.seq_len, run.micro, run.rt.device,
                        autocast(run.rt.device, run.tcfg.precision))
    total = all_reduce(torch.tensor([nll, n], dtype=torch.float64, device=run.rt.device), run.rt)
    return (total[0] / total[1]).item()


def save(run: Run, dest: Path) -> Path:
    """A training checkpoint of the run as it is now (every rank takes part; rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    if run.tcfg.fsdp:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(run.model, options=opts)
        osd = get_optimizer_state_dict(run.model, run.opt, options=opts)
    else:
        msd, osd = run.bare.state_dict(), get_optimizer_state_dict(run.bare, run.opt)
    if run.rt.is_main:
        rng = {"torch_cpu": torch.get_rng_state()}
        if run.rt.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(run.rt.device)
        ckpt_io.save_training_checkpoint(
            dest, model_state=msd, model_config=run.cfg, optimizer_state=osd, rng_state=rng,
            trainer_state=dict(step=run.step, tokens=run.tokens, total_steps=run.total, elapsed_s=run.elapsed,
                               train_time_s=run.train_time, sampler=run.sampler.state_dict(),
                               world_size=run.rt.world, train_config=run.tcfg.to_dict(), last=run.last,
                               data=run.data, skipped_steps=run.skipped, skip_streak=run.skip_streak,
                               window=asdict(run.window)),
        )
        if run.tcfg.keep_checkpoints and dest.name != "final":
            ckpt_io.prune_checkpoints(run.out, run.tcfg.keep_checkpoints)
    barrier(run.rt)
    return dest


def log(run: Run, rec: dict) -> None:
    if not run.rt.is_main:
        return
    append_line(run.out / "metrics.jsonl", json.dumps(rec), "metrics.jsonl")
    if run.tb is not None:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                run.tb.add_scalar(k, v, rec["step"])


# ---------------------------------------------------------------------------------------------------------------
# The loop


class StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop; the second one interrupts at once."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce  # one rank says it, not every rank
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nmemoryformer: stopping after this step and saving a checkpoint (press Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def loop(run: Run) -> str:
    """Train until the schedule ends or something stops it; returns why it stopped ("done", "time_budget",
    "stop_after", "interrupt")."""
    run.model.train()
    first, start = run.step, time.perf_counter()
    bar = _progress_bar(run)
    try:
        with StopFlag(announce=run.rt.is_main) as stop:
            return _steps(run, stop, first, start, bar)
    finally:
        if bar is not None:
            bar.close()


def _steps(run: Run, stop: StopFlag, first: int, start: float, bar) -> str:
    t, rt = run.tcfg, run.rt
    win = run.window  # carried across checkpoints: a resumed run logs the same lines as an uninterrupted one
    while run.step < run.total:
        t0 = time.perf_counter()
        loss, gnorm, lr, stepped = train_step(run)
        dt = time.perf_counter() - t0
        run.step, run.tokens, run.train_time = run.step + 1, run.tokens + run.tokens_per_step, run.train_time + dt
        if stepped:
            run.skip_streak = 0
            win.tokens, win.seconds, win.loss, win.steps = win.tokens + run.tokens_per_step, win.seconds + dt, \
                win.loss + loss, win.steps + 1
        else:
            skipped(run, loss, gnorm, lr, bar)
        # Every rank must agree on stopping: a stop request or the time budget on any rank stops all.
        over = t.time_budget is not None and time.perf_counter() - start >= t.time_budget
        flag = 2.0 * stop.requested + float(over)
        if rt.world > 1:
            flag = all_reduce(torch.tensor([flag], device=rt.device), rt, "max").item()
        paused = t.stop_after is not None and first < t.stop_after <= run.step < run.total
        stopping = flag > 0 or run.step == run.total or paused
        due = bool(t.eval_every and run.step % t.eval_every == 0)
        # An interrupt logs nothing: its window goes into the checkpoint and the resumed run logs it where an
        # uninterrupted one would have.
        if flag < 2 and (stopping or due or (win.steps and (run.step % t.log_every == 0 or run.step == 1))):
            _log_window(run, win, lr, gnorm, stopping or due, bar, run.elapsed + time.perf_counter() - t0)
            win.reset()
        if bar is not None:
            bar.update(1)
            if "loss" in run.last:
                bar.set_postfix(loss=f"{run.last['loss']:.3f}", tok_s=f"{run.last['tokens_per_s']:,.0f}",
                                refresh=False)
        run.elapsed += time.perf_counter() - t0
        if flag >= 2:
            return "interrupt"
        if flag >= 1:
            return "time_budget"
        if paused:
            return "stop_after"
        if t.ckpt_every and run.step % t.ckpt_every == 0 and run.step < run.total:
            save(run, run.out / f"ckpt-{run.step}")
    return "done"


def skipped(run: Run, loss: float, gnorm: float, lr: float, bar) -> None:
    """Record a step skipped for a non-finite loss or gradient norm; too many in a row stop the run."""
    run.skipped, run.skip_streak = run.skipped + 1, run.skip_streak + 1
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    value = loss if what == "loss" else gnorm
    log(run, dict(step=run.step, skipped=True, reason=f"non-finite {what} ({value})", lr=lr, tokens=run.tokens))
    if run.rt.is_main and run.tcfg.verbose:
        line = (f"step {run.step}: {what} is {value}; step skipped (no parameter update; {run.skip_streak} in a row, "
                f"at most {run.tcfg.max_skipped_steps})")
        if bar is not None:
            bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)
    if run.skip_streak >= run.tcfg.max_skipped_steps:
        newest = ckpt_io.list_checkpoints(run.out)
        where = f"the newest checkpoint is {newest[-1][1]}" if newest else "no checkpoint was written"
        raise MemoryFormerError(
            f"step {run.step}: {run.skip_streak} consecutive steps (from step {run.step - run.skip_streak + 1}) had a "
            f"non-finite loss or gradient norm (--max-skipped-steps {run.tcfg.max_skipped_steps}); stopping, "
            f"{where} (try a lower --lr or a --grad-clip)")


def _progress_bar(run: Run):
    if not (run.rt.is_main and run.tcfg.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.total, initial=run.step, unit="step", dynamic_ncols=True, desc=run.cfg.arch)


def _log_window(run: Run, win: LogWindow, lr: float, gnorm: float, evaluate_now: bool, bar, elapsed: float) -> None:
    rec = dict(step=run.step)
    if win.steps:  # else every step since the last line was skipped: only the evaluation to report
        lt = all_reduce(torch.tensor([win.loss / win.steps], device=run.rt.device), run.rt).item() / run.rt.world
        rec["loss"] = round(lt, 6)
    rec.update(lr=lr, tokens=run.tokens)
    if win.steps:
        rec.update(tokens_per_s=round(win.tokens / max(win.seconds, 1e-9), 1), grad_norm=round(gnorm, 6))
    rec["elapsed_s"] = round(elapsed, 2)
    if evaluate_now:
        vl = evaluate(run)
        rec.update(val_loss=round(vl, 6), val_ppl=round(math.exp(min(vl, 50.0)), 4))
        run.val_loss = vl
        train_part = f"train loss {rec['loss']:.4f}, " if "loss" in rec else ""
        line = f"step {run.step}: {train_part}val loss {vl:.4f}, val ppl {rec['val_ppl']:.2f}"
        if bar is not None:
            bar.write(line)
        elif run.tcfg.verbose and run.rt.is_main:
            print(line + (f", {rec['tokens_per_s']:,.0f} tokens/s" if "loss" in rec else ""), flush=True)
    log(run, rec)
    run.last = rec


def finish(run: Run, stopped_by: str) -> dict:
    """Check that the ranks agree, write the last checkpoint and summary.json; the summary."""
    checksums = dist_mod.rank_checksums(run.model if run.tcfg.fsdp else run.bare, run.rt, run.tcfg.fsdp)
    if len(set(checksums)) > 1:
        raise RuntimeError(f"ranks disagree on the trained parameters (checksums {checksums})")
    if stopped_by in ("interrupt", "stop_after"):
        path = save(run, run.out / f"ckpt-{run.step}")
        if stopped_by == "interrupt" and run.rt.is_main:
            print(f"interrupted at step {run.step}: checkpoint saved to {path}; continue with: memoryformer train "
                  f"--resume {run.out}", file=sys.stderr)
    else:
        path = save(run, run.out / "final")
    if run.tb is not None:
        run.tb.close()
    val_loss = run.val_loss
    s = summary(run, str(path), val_loss, stopped_by, checksums)
    if run.rt.is_main:
        write_text(run.out / "summary.json", json.dumps(s, indent=1) + "\n")
        if stopped_by != "interrupt" and val_loss is not None and run.tcfg.verbose:
            print(f"{'done' if stopped_by == 'done' else 'paused'}: {run.step} steps, {run.tokens:,} tokens, val loss "
                  f"{val_loss:.4f} (ppl {s['val_ppl']:.2f}); model in {path}")
    return s


def summary(run: Run, checkpoint: str, val_loss: float | None, stopped_by: str, checksums=None) -> dict:
    return dict(
        out=str(run.out), checkpoint=checkpoint, steps=run.step, total_steps=run.total, tokens=run.tokens,
        elapsed_s=round(run.elapsed, 2), tokens_per_s=round(run.tokens / max(run.train_time, 1e-9), 1),
        train_loss=run.last.get("loss"), val_loss=val_loss,
        val_ppl=math.exp(min(val_loss, 50.0)) if val_loss is not None else None,
        params=run.bare.num_params(), stopped_by=stopped_by, arch=run.cfg.arch, skipped_steps=run.skipped,
        **({"rank_checksums": checksums} if checksums is not None else {}),
    )
