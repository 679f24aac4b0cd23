"""`memoryformer serve`: an OpenAI-compatible HTTP server over a checkpoint (the optional extra `serve`)."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from memoryformer.cli.args import add_tables, add_verify, duration, positive
from memoryformer.config import ConfigError, MemoryFormerError

API_KEY_ENV = "MEMORYFORMER_API_KEY"


def add_serve(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run folder")
    add_tables(p, "load for inference with the memory tables in this dtype; every slot then decodes through the "
               "compiled engine (int4: the eager model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="slots: requests decoded at once (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before new ones get 503 "
                   "(default 64)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help="require 'Authorization: Bearer KEY' on "
                   f"every request (default: ${API_KEY_ENV}; unset: no key)")
    p.add_argument("--model-name", help="the model's id in the API (default: the checkpoint folder's name)")
    p.add_argument("--prefill-chunk", type=int, default=0, metavar="N", help="prompt tokens sent with each decode "
                   "step (chunked prefill); 0 (default): an admitted prompt is prefilled whole between two steps")
    p.add_argument("--max-seq-len", type=int, help="context of each slot (default: the model's max_seq_len)")
    p.add_argument("--drain-timeout", type=duration, default=30.0, metavar="SECONDS", help="after SIGTERM, time "
                   "the requests in flight get to finish before they are cancelled (default 30s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--spin-us", type=int, default=2000, metavar="US", help="microseconds an idle kernel thread "
                   "spins before it sleeps (default 2000; shorter gives other processes the cores sooner between "
                   "steps)")
    p.add_argument("--eager", action="store_true", help="decode with the eager model even where the compiled "
                   "engine could run it (the reference)")
    p.add_argument("--device", default="cpu")
    add_verify(p)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args) -> None:
    try:
        from memoryformer.serve import app as web
    except ImportError as e:
        raise MemoryFormerError(str(e)) from None
    import torch

    from memoryformer.checkpoint import load_model
    from memoryformer.data import EOT_ID, decode, encode
    from memoryformer.serve import Scheduler, slot_engine_for

    positive(max_batch=args.max_batch, threads=args.threads, max_seq_len=args.max_seq_len)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"port: expected 0..65535, got {args.port}")
    if args.prefill_chunk < 0:
        raise ConfigError(f"prefill-chunk: expected an integer >= 0, got {args.prefill_chunk}")
    if args.max_queue < 0:
        raise ConfigError(f"max-queue: expected an integer >= 0, got {args.max_queue}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    log = logging.getLogger("memoryformer.serve")
    if not _loopback(args.host) and not args.api_key:
        log.warning("serve: listening on %s with no --api-key: anyone who reaches it can use it", args.host)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.spin_us < 0:
        raise ConfigError(f"spin-us: expected an integer >= 0, got {args.spin_us}")
    from memoryformer.ops import cpu_ext

    cpu_ext.spin_us(args.spin_us)
    model = load_model(args.checkpoint, device=args.device, verify=args.verify, tables=args.tables)
    try:
        engine = slot_engine_for(model, args.max_batch, engine=False if args.eager else None,
                                 max_seq_len=args.max_seq_len)
    except ValueError as e:
        raise MemoryFormerError(str(e)) from None
    name = args.model_name or Path(args.checkpoint).resolve().name
    scheduler = Scheduler(engine, max_queue=args.max_queue, decode=decode, eos_id=EOT_ID,
                          prefill_chunk=args.prefill_chunk).start()
    log.info("serve: %s (%s, %d slots of %d tokens) on http://%s:%d/v1", name, engine.kind, engine.max_batch,
                 engine.max_seq_len, args.host, args.port)
    app = web.build_app(scheduler, model_name=name, encode=encode, api_key=args.api_key,
                        drain_timeout=args.drain_timeout)
    web.serve(app, scheduler, host=args.host, port=args.port, drain_timeout=args.drain_timeout)
