"""The `gla` command: train, generate, eval (ppl, mqar), bench (ops).

    gla train --data PATH --out DIR [--preset demo --steps N ...]     (torchrun ... gla train --parallel ddp|fsdp)
    gla generate --ckpt DIR --prompt TEXT                              (DIR: a checkpoint or a `gla export` directory)
    gla export --ckpt DIR --out DIR [--quantize int8|int4]
    gla convert --from HF_OR_GLA_DIR --out DIR --layers 3:1
    gla eval ppl --ckpt DIR --data PATH [--seq-len N] [--split val] --json
    gla bench ops [--T 4096 ... --json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

QUANTIZE = ("int8", "int4")  # gla.export.to_onnx.QUANTIZE less None, named here so that the CLI imports no exporter

S = argparse.SUPPRESS  # train flags not given keep the TrainConfig default, or the saved value on --resume


def _train_parser(sub, name="train", short="train a GLA language model",
                  description="Train a GLA language model on a corpus (default: Shakespeare's plays)."):
    p = sub.add_parser(name, help=short, argument_default=S, description=description)
    a = p.add_argument
    a("--data", help="'shakespeare' (default corpus), a .txt/.md/.jsonl file, a folder, or hf:NAME[:CONFIG]")
    a("--tokenizer", help="'bytes' (default) or a tokenizer.json file")
    a("--preset", help="model preset: tiny, demo (default), gla-340m, gla-1.3b")
    for name, kind in (("d-model", int), ("n-layers", int), ("n-heads", int), ("d-ff", int), ("dropout", float)):
        a(f"--{name}", type=kind, help="override the preset")
    a("--mixer", choices=("gla", "linear", "retnet", "seed", "softmax"),
      help="token mixer of every layer (gla; the others are baselines for comparisons)")
    a("--gate-bias-init", type=float,
      help="initial bias of the forget gate of gla and seed layers (0, as FLA); larger starts with less decay")
    a("--seq-len", type=int, help="tokens per training sequence (256)")
    a("--batch-size", type=int, help="sequences per optimizer step, over all processes (32)")
    a("--grad-accum", type=int, help="micro-steps per optimizer step (1)")
    a("--steps", type=int, help="optimizer steps (1000)")
    a("--lr", type=float, help="peak learning rate (1e-3)")
    a("--min-lr", type=float, help="final learning rate of the cosine (lr / 10)")
    a("--warmup", type=int, help="linear warmup steps (100)")
    a("--weight-decay", type=float, help="AdamW weight decay on matrices (0.1)")
    a("--beta1", type=float, help="AdamW beta1 (0.9)")
    a("--beta2", type=float, help="AdamW beta2 (0.95)")
    a("--grad-clip", type=float, help="gradient-norm clipping, 0 = off (1.0)")
    a("--nonfinite-limit", type=int,
      help="stop (exit 3) after N steps in a row with a non-finite loss or gradient: a diverged run (10)")
    a("--val-fraction", type=float, help="last fraction of the tokens held out for validation (0.1)")
    a("--eval-every", type=int, help="validate every N steps (250)")
    a("--eval-batches", type=int, help="batches of --batch-size windows per validation (20)")
    a("--ckpt-every", type=int, help="checkpoint every N steps (default: --eval-every)")
    a("--log-every", type=int, help="metrics.jsonl record every N steps (10)")
    a("--sample-tokens", type=int, help="tokens per sample written to samples.txt at the end, 0 = none (300)")
    a("--seed", type=int, help="random seed (1337)")
    a("--device", help="auto (default), cpu, cuda")
    a("--dtype", choices=("auto", "fp32", "bf16"),
      help="auto: bf16 autocast on CUDA, and on a CPU whose bf16 matmuls measure 1.5x the fp32 speed (AMX); "
           "fp32 elsewhere")
    a("--compile", choices=("auto", "on", "off"),
      help="torch.compile each layer and the loss on its own (the first step compiles, ~25 s at gla-340m); auto: "
           "on for CUDA, where it measured 2.1x faster at gla-340m, off on the CPU (no faster there)")
    a("--parallel", choices=("none", "ddp", "fsdp"), help="data parallelism under torchrun")
    a("--checkpoint-activations", action="store_true",
      help="keep only each layer's input and recompute the rest in the backward: less memory for long sequences, "
           "one more forward per step")
    a("--memory-budget", type=float,
      help="compiled layers keep this fraction of their activations for the backward and recompute the rest "
           "(torch's activation_memory_budget; 1 = keep all): 0.5 measured -36%% memory for +7%% time at gla-340m "
           "on an H100; below 1 needs --dropout 0")
    a("--out", help="run directory (runs/gla)")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--json", action="store_true", help="print a JSON summary instead of a progress bar")
    return p


def _distill_parser(sub):
    p = _train_parser(sub, "distill", "distil a softmax teacher into a converted GLA / hybrid model",
                      "Distil a softmax teacher into a converted GLA / hybrid student (gla convert): "
                                      "attention transfer, then training with KL to the teacher's logits. Takes "
                                      "gla train's data, schedule and device flags; the reported loss includes "
                                      "the KL term, the validation loss is next-token loss alone.")
    a = p.add_argument
    a("--teacher", help="a gla checkpoint or a Hugging Face Llama / Qwen2 directory")
    a("--student", dest="init_from", help="the converted model directory (gla convert --out)")
    a("--kl-weight", type=float, help="weight of KL(teacher || student) per token beside the next-token loss (3.0)")
    a("--transfer-steps", type=int, help="stage 1: attention-transfer steps before training (0)")
    a("--lora", type=int, help="stage 2 with LoRA adapters of this rank on the GLA layers' projections, the rest "
                               "frozen but the gates and output norms (0: full fine-tuning; needs peft)")


def _cmd_distill(args) -> int:
    import os
    if not getattr(args, "resume", False):
        if not getattr(args, "teacher", None) or not getattr(args, "init_from", None):
            raise ValueError("gla distill needs --teacher and --student (or --resume)")
        tok = os.path.join(args.init_from, "tokenizer.json")
        if not hasattr(args, "tokenizer") and os.path.isfile(tok):
            args.tokenizer = tok
    return _cmd_train(args)


def _cmd_train(args) -> int:
    from gla.training import TrainConfig, resume_config, train
    given = vars(args).copy()
    for k in ("cmd", "func", "resume", "json"):
        given.pop(k, None)
    resume, as_json = getattr(args, "resume", False), getattr(args, "json", False)
    cfg = resume_config(given.pop("out", "runs/gla"), given) if resume else TrainConfig(**given)
    summary = train(cfg, resume=resume, progress=not as_json)
    if summary is None or "plot" not in summary:  # ranks other than 0 print nothing
        return 0
    if as_json:
        from gla.training.report import finite_or_null
        print(json.dumps(finite_or_null(summary), allow_nan=False))
    else:
        print(f"\n--- sample ---\n{summary.get('sample', '')}\n--------------")
        print(f"step {summary['step']}: train loss {summary['loss']:.4f}, val loss {summary['val_loss']:.4f} "
              f"(nats/token), {summary['train_time_s']:.1f}s of training")
        print(f"checkpoint: {summary['out']}   loss plot: {summary['plot']}   samples: {summary.get('samples')}")
    return 0


@contextlib.contextmanager
def _quantized(args):
    """--quantize int8 / int4 on a checkpoint: such an export in a temporary directory, run by ONNX Runtime (faster
    than eager int8 here: benchmarks/NOTES.md); sets args.ckpt to it for the duration."""
    import os
    import tempfile

    from gla.export import export, export_meta
    if getattr(args, "quantize", None) is None:
        yield
        return
    meta = export_meta(args.ckpt)
    if meta is not None:  # an export's weights are fixed when it is written
        have = meta.get("quantize")
        if have != args.quantize:
            raise ValueError(f"{args.ckpt} is an export with {have or 'fp32'} weights, which cannot be quantised "
                             f"again: run `gla export --quantize {args.quantize}` on its checkpoint")
        yield
        return
    with tempfile.TemporaryDirectory(prefix="gla-quantized-") as tmp:
        out = os.path.join(tmp, "export")
        export(args.ckpt, out, quantize=args.quantize)
        args.ckpt = out
        yield


def _sampler(args):
    """(tokenizer, run(ids, callback) -> new token ids) for a checkpoint or an export directory."""
    from gla.export import export_meta
    if export_meta(args.ckpt) is not None:
        if args.device not in ("auto", "cpu"):
            raise ValueError(f"{args.ckpt} is an export directory: it runs on the CPU (ONNX Runtime), not "
                             f"{args.device}")
        from gla.export import load_exported
        m = load_exported(args.ckpt)
        return m.codec, lambda ids, cb: m.generate(ids, args.max_new_tokens, args.temperature, args.top_k,
                                                   args.top_p, args.seed, callback=cb)
    import torch
    from gla.data import tokenizer_for
    from gla.device import resolve_device
    from gla.generation import generate
    from gla.models import from_pretrained
    dev = resolve_device(args.device)
    model = from_pretrained(args.ckpt).to(dev)
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    def run(ids, cb):
        # on a GPU, new tokens come to the host STREAM_BATCH at a time: one wait per batch, not per token
        collect, flush = _batched(cb, STREAM_BATCH if dev.type != "cpu" else 1)
        out = generate(model, torch.tensor([ids], device=dev), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, callback=None if cb is None else collect,
                       generator=gen, compile_step=args.compile)
        flush()
        return out[0, len(ids):].tolist()
    return tokenizer_for(args.ckpt), run


STREAM_BATCH = 8


def _batched(cb, n: int):
    """(collect, flush): collect(tokens [1] on any device) keeps them and hands every n of them to cb(int) in one
    transfer to the host; flush() hands over the rest."""
    import torch
    pending = []

    def flush():
        if cb is not None and pending:
            values = torch.cat(pending).tolist()
            pending.clear()
            for v in values:
                cb(v)

    def collect(t):
        pending.append(t[:1])
        if len(pending) >= n:
            flush()
    return collect, flush


def _cmd_generate(args) -> int:
    from gla.export import export_meta
    from gla.generation import check_sampling
    if args.max_new_tokens < 0:  # before an export (--quantize) or anything printed
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.compile and (args.quantize or export_meta(args.ckpt) is not None):
        raise ValueError("--compile compiles a PyTorch model's decoding step; with --quantize or an export directory "
                         "the model runs on ONNX Runtime")
    with _quantized(args):
        return _generate(args)


class _Stop(Exception):
    """A stop string appeared: args[0] is where it starts in the completion."""


def _generate(args) -> int:
    tok, run = _sampler(args)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    stops = [s for s in args.stop or [] if s]
    hold = max((len(s) for s in stops), default=1) - 1  # text that may still become a stop string is not shown yet
    new, shown = [], [0]

    def show(upto: int):
        if not args.json and upto > shown[0]:
            sys.stdout.write(tok.decode(new)[shown[0]:upto])
            sys.stdout.flush()
            shown[0] = upto

    def emit(token: int):  # stream the decoded suffix, holding back an incomplete multi-byte character
        new.append(token)
        text = tok.decode(new)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            show(min(hits))
            raise _Stop(min(hits))
        if not text.endswith("\ufffd"):
            show(len(text) - hold)

    if not args.json:
        sys.stdout.write(args.prompt)
    try:
        out = run(ids, emit if stops or not args.json else None)
        text = tok.decode(out)
    except _Stop as stop:
        out, text = new, tok.decode(new)[:stop.args[0]]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "new_tokens": len(out)}))
    else:
        sys.stdout.write(text[shown[0]:] + "\n")
    return 0


def _cmd_convert(args) -> int:
    from gla.distill import convert
    model = convert(args.src, args.out, args.layers, args.gate_bias_init)
    kinds = [layer.mixer for layer in model.layers]
    print(f"converted {args.src} -> {args.out}: {kinds.count('gla')} GLA and {kinds.count('softmax')} softmax layers, "
          f"{model.num_parameters() / 1e6:.1f}M parameters")
    return 0


def _cmd_export(args) -> int:
    from gla.export import export
    meta = export(args.ckpt, args.out, args.quantize, args.max_block)
    print(f"exported {args.ckpt} -> {args.out} ({meta['graph']}, weights {meta['quantize'] or 'fp32'}); "
          f"run: python {args.out}/run.py --prompt TEXT, or gla generate --ckpt {args.out}")
    return 0


def _cmd_ppl(args) -> int:
    from gla.eval.ppl import evaluate
    with _quantized(args):
        res = evaluate(args.ckpt, args.data, args.seq_len, args.split, args.val_fraction, args.device)
    if args.json:
        print(json.dumps(res))
    else:
        ctx = f"windows of {args.seq_len} tokens" if args.seq_len else "unbounded context (recurrent state)"
        print(f"{res['data']} [{res['split']}], {ctx}: loss {res['loss']:.4f} nats/token, "
              f"{res['bpb']:.4f} bits/byte, perplexity {res['ppl']:.2f} over {res['tokens']:,} tokens")
    return 0


def _cmd_mqar(args) -> int:
    from gla.eval import mqar_report
    mqar_report.run(args)
    return 0


def _cmd_compare(args) -> int:
    from gla.eval import compare
    compare.run(args)
    return 0


def _cmd_harness(args) -> int:
    from gla.eval.harness import evaluate
    res = evaluate(args.ckpt, [t for t in args.tasks.split(",") if t], args.text, args.limit, args.batch_size,
                   args.device)
    print(json.dumps(res, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gla", description="Gated Linear Attention language models")
    sub = p.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    sub.choices["train"].set_defaults(func=_cmd_train)
    _distill_parser(sub)
    sub.choices["distill"].set_defaults(func=_cmd_distill)

    g = sub.add_parser("generate", help="sample text from a checkpoint, streamed to stdout")
    g.add_argument("--ckpt", required=True, help="run, checkpoint or `gla export` directory")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max-new-tokens", type=int, default=300)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--json", action="store_true", help="print the completion as JSON at the end")
    g.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="int8 / int4 weights: the checkpoint exported to ONNX Runtime for this run (CPU)")
    g.add_argument("--stop", action="append", default=None,
                   help="stop when the completion contains this text, which is left out (repeatable)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (seconds to compile, then faster steps: "
                        "the demo model on a 2-core CPU 1.11 -> 0.64 ms/token). On a GPU the presets' default "
                        "step is already fused Triton kernels (gla-340m at batch 1: 0.46 ms/token); compiling "
                        "(~40 s once, matmuls autotuned) measured faster at 16-64 rows")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("convert", help="a pretrained softmax transformer as a GLA or hybrid model")
    c.add_argument("--from", dest="src", required=True,
                   help="a Hugging Face Llama / Qwen2 directory (safetensors) or a gla softmax checkpoint")
    c.add_argument("--out", required=True, help="new directory to write")
    c.add_argument("--layers", default="3:1",
                   help="layers that become GLA: all, none, a ratio G:S (e.g. 3:1) or indices (0,1,2,4)")
    c.add_argument("--gate-bias-init", type=float, default=4.0,
                   help="initial forget-gate bias of the new GLA layers (larger: longer memory at first)")
    c.set_defaults(func=_cmd_convert)

    x = sub.add_parser("export", help="export a checkpoint to a standalone ONNX directory (ONNX Runtime)")
    x.add_argument("--ckpt", required=True, help="run or checkpoint directory")
    x.add_argument("--out", required=True, help="new directory to write")
    x.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="int8 or int4 weights in blocks of 32 (fp32 recurrent state)")
    x.add_argument("--max-block", type=int, default=64, help="tokens per graph call when prefilling")
    x.set_defaults(func=_cmd_export)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="task", required=True)
    pp = ev.add_parser("ppl", help="loss / bits per byte / perplexity on text")
    pp.add_argument("--ckpt", required=True, help="run or checkpoint directory")
    pp.add_argument("--data", required=True, help="as for gla train --data")
    pp.add_argument("--seq-len", type=int, default=None, help="windows of N tokens (default: unbounded context)")
    pp.add_argument("--split", choices=("all", "train", "val"), default="all",
                    help="score all the text or one side of the training split")
    pp.add_argument("--val-fraction", type=float, default=0.1)
    pp.add_argument("--device", default="auto")
    pp.add_argument("--json", action="store_true")
    pp.add_argument("--quantize", choices=QUANTIZE, default=None,
                    help="int8 / int4 weights: the checkpoint exported to ONNX Runtime for this run (CPU)")
    pp.set_defaults(func=_cmd_ppl)
    from gla.eval import mqar_report
    mq = ev.add_parser("mqar", help="multi-query associative recall across token mixers")
    mqar_report.add_arguments(mq)
    mq.set_defaults(func=_cmd_mqar)
    from gla.eval import compare
    cp = ev.add_parser("compare", help="train and evaluate one model per token mixer, same data and budget")
    compare.add_arguments(cp)
    cp.set_defaults(func=_cmd_compare)
    hz = ev.add_parser("harness", help="lm-evaluation-harness tasks, or a local text file as a task")
    hz.add_argument("--ckpt", required=True, help="run or checkpoint directory")
    hz.add_argument("--tasks", default="", help="comma-separated lm-eval task names")
    hz.add_argument("--text", default=None, help="a local text file scored as a rolling-loglikelihood task")
    hz.add_argument("--limit", type=int, default=None, help="documents per task")
    hz.add_argument("--batch-size", type=int, default=1)
    hz.add_argument("--device", default="cpu")
    hz.set_defaults(func=_cmd_harness)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    b.add_parser("ops", help="operator benchmark: gla bench ops --help")  # dispatched in main()
    b.add_parser("decode", help="decode latency and memory vs context: gla bench decode --help")
    b.add_parser("train", help="training step, eager vs torch.compile: gla bench train --help")
    b.add_parser("nanogpt", help="nanoGPT's CPU recipe, nanoGPT vs gla train: gla bench nanogpt --help")
    b.add_parser("cpu-generate", help="CPU generation, eager vs exported ONNX: gla bench cpu-generate --help")
    b.add_parser("generate", help="generation, ours vs a static-cache HF Llama: gla bench generate --help")
    b.add_parser("step-profile", help="the captured decode step kernel by kernel: gla bench step-profile --help")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from gla.device import hold_freed_host_memory
    hold_freed_host_memory()  # this process is ours: CPU steps stop page-faulting their buffers in (gla/device.py)
    if argv[:1] == ["bench"] and argv[1:2] in (["ops"], ["decode"], ["train"], ["nanogpt"], ["cpu-generate"],
                                                 ["generate"], ["step-profile"]):
        import importlib  # these have their own parsers
        importlib.import_module(f"gla.bench.{argv[1].replace('-', '_')}").main(argv[2:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"gla {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a diverged run is an outcome to report in one line, not a crash
        from gla.training.trainer import Diverged
        if not isinstance(e, Diverged):
            raise
        print(f"gla {args.cmd}: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"gla {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
