"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), the recall test of the GLA paper (Fig. 4).

A sequence starts with num_kv_pairs key-value pairs (keys from the lower half of the vocabulary, values from the
upper half), then keys are queried again at positions whose distance from the context follows a power law; the
model must emit the key's value at the token after each query. Only those positions are scored. Everything else
is random filler, so the task measures recall from the state, not language modelling.

Models of one task train in lockstep on the same batches (``train_group``). On CUDA each model's whole training
step (forward, backward, clipping, AdamW) is captured once as a CUDA graph and replayed on the model's own stream:
the replay drops the per-kernel launch cost and the streams let the small kernels of a group's models overlap
(H200, T=128, fp32: 1.5x for one model, 1.85x for a group of 16; benchmarks/NOTES.md). The command line and the
tables are in ``mqar_report``.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gla.data import IGNORE_INDEX
from gla.eval import mqar_state
from gla.training.report import say
from gla.eval.variants import mixer_variants, variant_slug
from gla.layers.block import GATED_MIXERS
from gla.models import GLATransformer

TEST_SEED = 10 ** 6  # one test set for every seed, so seeds differ only in what they train from
SEED_STRIDE = 10 ** 7  # seed s trains on batches s * SEED_STRIDE + step: streams apart from each other and from the
# test set for any budget under 10**6 steps, and seed 0's the same as before seeds existed


def make_mqar(n: int, seq_len: int, kv_pairs: int, vocab_size: int = 8192, power_a: float = 0.01, seed: int = 0):
    """n MQAR sequences -> (inputs [n, seq_len] long, labels [n, seq_len] long with IGNORE_INDEX where unscored)."""
    if 4 * kv_pairs > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for {kv_pairs} key-value pairs and their queries")
    if vocab_size < 4 * kv_pairs + 2:
        raise ValueError(f"vocab_size={vocab_size} is too small for {kv_pairs} distinct keys and values")
    g = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    keys = torch.randint(1, half, (n, kv_pairs), generator=g)
    while True:  # distinct keys per row: redraw the few rows with a repeat
        srt = keys.sort(1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(1).nonzero().squeeze(1)
        if dup.numel() == 0:
            break
        keys[dup] = torch.randint(1, half, (dup.numel(), kv_pairs), generator=g)
    values = torch.randint(half, vocab_size, (n, kv_pairs), generator=g)
    ctx = 2 * kv_pairs
    seq = torch.randint(1, vocab_size, (n, seq_len + 1), generator=g)
    seq[:, 0:ctx:2], seq[:, 1:ctx:2] = keys, values
    # Query slots sit at ctx + 2*gap; gaps drawn without replacement with probability ~ gap^(power_a - 1).
    slots = (seq_len + 1 - ctx) // 2
    p = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(p.expand(n, slots), kv_pairs, replacement=False, generator=g)
    pos = ctx + 2 * gaps  # [n, kv_pairs]
    which = torch.rand(n, kv_pairs, generator=g).argsort(1)
    rows = torch.arange(n).unsqueeze(1)
    seq[rows, pos] = keys.gather(1, which)
    labels = torch.full_like(seq, IGNORE_INDEX)
    labels[rows, pos + 1] = values.gather(1, which)
    seq[rows, pos + 1] = values.gather(1, which)
    return seq[:, :-1], labels[:, 1:]


@dataclass
class MQARResult:
    """One trained model's held-out accuracy on the scored (query) positions, and its loss on the last training batch;
    seconds is the wall time of the group it trained in (resumed: with the time before its last save)."""
    mixer: str
    d_model: int
    seq_len: int
    kv_pairs: int
    lr: float
    accuracy: float
    steps: int
    seconds: float
    short_conv: bool = False
    final_loss: float | None = None  # absent from records written before it existed
    precision: str = "fp32"  # "bf16": forward under bf16 autocast
    batch_size: int | None = None  # absent from records written before it existed
    mlp: str = "swiglu"  # "none": blocks without an MLP (Zoology's MQAR models)
    stopped_at: int | None = None  # the step its accuracy reached stop_at (it trained no further); None: trained on
    # to the last step, which is not checked (its accuracy is the one reported)
    seed: int = 0  # its initial weights and data order (records from before seeds existed were all seed 0)
    gate_bias_init: float = 0.0  # the data-dependent forget gate's initial bias (0 for mixers without that gate)


def _loss_and_acc(model, x, y, kv_pairs: int, bf16: bool = False):
    """x, y: [B, T] with exactly kv_pairs scored labels per row (as make_mqar makes them) -> (loss, accuracy).

    The scored positions are found with a fixed-shape top-k rather than a boolean mask, whose data-dependent shape
    would make the host wait for the GPU (and could not be captured in a CUDA graph). bf16: the model runs under
    bf16 autocast, without its cache of cast weights (a captured graph would replay stale casts)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        h, _ = model.features(x, use_cache=False)
        idx = (y != IGNORE_INDEX).to(torch.float32).topk(kv_pairs, dim=1).indices  # [B, kv_pairs]
        target = y.gather(1, idx)
        logits = model.lm_head(h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1])))  # [B, kv_pairs, vocab]
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    return loss, (logits.argmax(-1) == target).float().mean()


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10% of the steps, then cosine decay to zero."""
    warm = max(1, steps // 10)
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))


@dataclass
class _Member:
    """One model of a group, its optimizer and (on CUDA) its captured training step and stream."""
    spec: dict  # mixer, d_model, lr and optionally gate_bias_init
    model: GLATransformer
    opt: torch.optim.Optimizer
    bf16: bool
    gate_bias_init: float  # as recorded: the model's, or 0 where it has no data-dependent gate to start
    graph: torch.cuda.CUDAGraph | None = None
    stream: torch.cuda.Stream | None = None
    loss: torch.Tensor | None = None  # the last step's loss (with graphs: the captured step's output buffer)
    stopped_at: int | None = None

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            if torch.is_tensor(g["lr"]):  # captured steps read the learning rate from this tensor
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def step(self, x, y, kv_pairs: int):
        """Forward, backward, clipping and update; the gradients are reset by the caller (eager) or by capture.
        Returns the loss detached: a loss that kept its autograd graph alive would pin the gradient accumulators to
        the stream of an eager step and break the capture of a later one."""
        loss, _ = _loss_and_acc(self.model, x, y, kv_pairs, self.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.detach()


def _member(spec: dict, seq_len: int, vocab_size: int, short_conv: bool, seed: int, device, bf16: bool,
            mlp: str) -> _Member:
    torch.manual_seed(seed)  # a model starts from the same weights whichever group it trains in
    d = spec["d_model"]
    model = GLATransformer(vocab_size, d, max(1, d // 64), 2 * d, 2, max_seq_len=seq_len, dropout=0.0,
                           layer_mixers=(spec["mixer"], spec["mixer"]), use_short_conv=short_conv, mlp=mlp,
                           gate_bias_init=spec.get("gate_bias_init", 0.0)).to(device)
    # On CUDA the optimizer is fused and capturable (learning rate and step count in device tensors) whether or not
    # the steps are captured, so eager and captured training run the same arithmetic. (The unfused capturable AdamW
    # took half of the device time of a d=128 model's step on the H200.)
    cuda = device.type == "cuda"
    lr = torch.tensor(spec["lr"], device=device) if cuda else spec["lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98), capturable=cuda,
                            fused=cuda or None)
    return _Member(spec, model, opt, bf16, model.config.gate_bias_init if spec["mixer"] in GATED_MIXERS else 0.0)


EAGER_STEPS = 3  # before capture: Triton compiles, AdamW creates its state, cuBLAS picks its workspaces


def _capture(m: _Member, x, y, kv_pairs: int) -> None:
    """Capture on the member's own stream: cuBLAS keeps a workspace per stream, and graphs captured on one shared
    stream would share it while their replays run concurrently (a race: losses drifted ~5e-4 relative in 12 steps)."""
    m.opt.zero_grad(set_to_none=True)  # the captured backward then writes fresh gradients on every replay
    m.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(m.graph, stream=m.stream):
        m.loss = m.step(x, y, kv_pairs)


def _accuracy(model, x_te, y_te, kv_pairs: int, device, bf16: bool) -> float:
    training = model.training
    model.eval()
    correct = 0.0
    with torch.no_grad():
        for s in range(0, len(x_te), 256):
            x, y = x_te[s:s + 256].to(device), y_te[s:s + 256].to(device)
            correct += _loss_and_acc(model, x, y, kv_pairs, bf16)[1].item() * len(x)  # every row has kv_pairs queries
    model.train(training)
    return correct / len(x_te)


def check_stopping(eval_every: int, stop_at: float | None) -> None:
    """Early stopping needs periodic evaluation and a target accuracy in [0, 1]."""
    if eval_every < 0 or (stop_at is not None and not (eval_every > 0 and 0.0 <= stop_at <= 1.0)):
        raise ValueError(f"stop_at needs eval_every > 0 and an accuracy in [0, 1], got eval_every={eval_every}, "
                         f"stop_at={stop_at}")


def check_seeds(seeds) -> None:
    """Seeds are distinct integers >= 0 (a repeated seed would train the same models twice)."""
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers >= 0 (each seed must be >= 0, none repeated), got {seeds}")


@contextlib.contextmanager
def _one_host_thread(on: bool):
    """Runs the block with torch's intra-op pool at one thread (on), then restores the caller's setting.

    Training on CUDA, the host's only work per step is drawing one batch with make_mqar (about 3 ms on one core at
    T=256, 16 pairs). Threads gain little there, and their barriers wait on threads that other busy processes
    deschedule. On one H200, with two CPU-bound processes beside it, a group of 4 models went from 22 to 70-110 ms
    per step, and to 22 ms with one thread. Two `gla eval mqar` processes, one per GPU of one host, ran small groups
    3-4x slower than one process alone (benchmarks/NOTES.md). A thread that first runs torch inside the block
    (autograd's CUDA worker, on a process's first backward) keeps one intra-op thread after it; it runs almost no
    CPU ops."""
    if not on:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# how a group runs, not what it trains
NOT_IDENTITY = ("specs", "graphs", "log_every", "state_path", "save_every", "progress")


def _identity(call: dict) -> dict:
    """mqar_state.group_identity of a train_group call given as its keyword arguments (defaults filled in): every
    argument not in NOT_IDENTITY, so a new one is part of it unless excluded on purpose."""
    args = inspect.signature(train_group).bind(**call)
    args.apply_defaults()
    settings = {k: v for k, v in args.arguments.items() if k not in NOT_IDENTITY}
    settings["device"] = torch.device(settings["device"]).type  # cuda:0 and cuda train alike; cpu does not
    return mqar_state.group_identity(args.arguments["specs"], **settings)


def train_group(specs, seq_len: int, kv_pairs: int, steps: int = 400, batch_size: int = 64, n_test: int = 1000,
                vocab_size: int = 8192, seed: int = 0, device: str = "cpu", short_conv: bool = False,
                graphs: bool | None = None, log_every: int = 0, precision: str = "fp32", eval_every: int = 0,
                stop_at: float | None = None, mlp: str = "swiglu", state_path: str | None = None,
                save_every: int = 0, progress=None) -> list:
    """Train 2-layer models of one MQAR task in lockstep; returns their MQARResult in the order of ``specs``.

    specs: [{"mixer": str, "d_model": int, "lr": float, "gate_bias_init": float (optional, 0: FLA's start of the
    forget gate; recorded for the mixers that have one)}, ...]. Every model starts from torch.manual_seed(seed) and
    trains on the same batch at each step (drawn from seed's own stream), so mixers and learning rates see the same
    data; the test set is the same for every seed. graphs (default: on CUDA) replays each model's captured step on
    its own stream instead of launching its kernels one by one (the same arithmetic as eager steps; the GPU test
    holds the two to 1e-4 of the loss). precision "bf16" runs the models under bf16 autocast (parameters and
    optimizer stay fp32). log_every > 0 prints the group's progress (steps done, seconds, each model's last training
    loss) to stderr that often, so a run cut short still tells its pace and how far each model got. eval_every > 0
    prints each training model's accuracy on the test set that often; with stop_at, a model whose accuracy reaches
    it stops there (Zoology stops at 0.99, on its test set too) and the group trains on without it, so the models
    that solve the task early give their compute to those that do not (their memory stays held). seconds includes
    the evaluations and saves. mlp: the blocks' MLP, "swiglu" or "none" (Zoology's MQAR models are token mixers
    alone; `gla eval mqar` defaults to it, this function to the models it trained first). state_path: where the
    group's progress is saved every save_every steps and its results at the end (``mqar_state``); a group that finds
    its own state there continues from it, or returns its results if it had finished (on the CPU exactly as if
    never stopped; on CUDA its steps before the next capture run eagerly, which agree with replays to 1e-4 of the
    loss). progress(done, skipped=0), if given, hears of every step trained here (done) and of the steps this call
    will not train (skipped: those before a resumed save, or after every model stopped), e.g. to keep a progress
    bar's rate and ETA to the steps that take time.
    """
    identity = _identity(dict(locals()))  # first: locals() is then exactly the arguments
    dev = torch.device(device)
    graphs = dev.type == "cuda" if graphs is None else graphs
    if graphs and dev.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f'precision must be "fp32" or "bf16", got {precision!r}')
    check_stopping(eval_every, stop_at)
    check_seeds([seed])
    if save_every < 0 or (save_every and not state_path):
        raise ValueError(f"save_every needs a state_path and must be >= 0, got {save_every}")
    bf16 = precision == "bf16"
    state = mqar_state.load(state_path, identity) if state_path else None
    progress = progress or (lambda done, skipped=0: None)
    if state is not None and "results" in state:
        progress(0, steps)
        return [MQARResult(**r) for r in state["results"]]
    with _one_host_thread(dev.type == "cuda"):  # the batches are drawn on the host; see _one_host_thread
        members = [_member(s, seq_len, vocab_size, short_conv, seed, dev, bf16, mlp) for s in specs]
        main = torch.cuda.current_stream(dev) if graphs else None
        for m in members:
            m.stream = torch.cuda.Stream(dev) if graphs else None  # eager steps and replays alike run on it
            m.model.train()
        x_te, y_te = make_mqar(n_test, seq_len, kv_pairs, vocab_size, seed=TEST_SEED)
        task = f"mqar T={seq_len}, {kv_pairs} pairs" + (f", seed {seed}" if seed else "")  # heads the progress lines
        start, spent = mqar_state.restore(state, members, dev) if state is not None else (0, 0.0)
        if start:
            say(f"{task}: resumed at step {start} from {state_path} ({spent:.1f} s before)")
        t0 = time.perf_counter() - spent
        active = [m for m in members if m.stopped_at is None]
        progress(0, start)
        done = start
        for step in range(start, steps):
            x, y = make_mqar(batch_size, seq_len, kv_pairs, vocab_size, seed=seed * SEED_STRIDE + step)
            if graphs and step >= start + EAGER_STEPS:
                if step == start + EAGER_STEPS:  # the captured steps read their batch from these buffers
                    xs, ys = torch.empty_like(x, device=dev), torch.empty_like(y, device=dev)
                    for m in active:
                        _capture(m, xs, ys, kv_pairs)
                xs.copy_(x.pin_memory(), non_blocking=True)  # after the previous replays: main waited for them
                ys.copy_(y.pin_memory(), non_blocking=True)
            else:
                xs, ys = x.to(dev), y.to(dev)
            f = lr_factor(step, steps)
            for m in active:
                if m.stream is not None:
                    m.stream.wait_stream(main)
                with torch.cuda.stream(m.stream):  # no-op for None
                    m.set_lr(m.spec["lr"] * f)
                    if m.graph is not None:
                        m.graph.replay()
                    else:
                        m.opt.zero_grad(set_to_none=True)
                        m.loss = m.step(xs, ys, kv_pairs)
            for m in active:
                if m.stream is not None:
                    main.wait_stream(m.stream)
            if log_every and (step + 1) % log_every == 0:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)  # the host may be steps ahead of the device
                losses = " ".join(f"{m.loss.item():.3f}" + ("(stopped)" if m.stopped_at else "") for m in members)
                say(f"{task}, {len(members)} models: step {step + 1}/{steps}, "
                    f"{time.perf_counter() - t0:.1f} s, losses {losses}")
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                accs = [_accuracy(m.model, x_te, y_te, kv_pairs, dev, bf16) for m in active]  # on main: after the steps
                say(f"{task}: step {step + 1}, accuracy "
                    + " ".join(f"{variant_slug(m.spec['mixer'], m.gate_bias_init)}/{m.spec['d_model']}/"
                               f"{m.spec['lr']:g}={a:.3f}" for m, a in zip(active, accs)))
                if stop_at is not None:
                    for m, a in zip(active, accs):
                        if a >= stop_at:
                            m.stopped_at = step + 1
                    active = [m for m in active if m.stopped_at is None]
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps and active:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                mqar_state.save_progress(state_path, identity, step + 1, time.perf_counter() - t0, members)
            progress(1)
            done = step + 1
            if not active:
                break
        progress(0, steps - done)  # the steps of a group whose models all solved the task early
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        results = [MQARResult(m.spec["mixer"], m.spec["d_model"], seq_len, kv_pairs, m.spec["lr"],
                              _accuracy(m.model, x_te, y_te, kv_pairs, dev, bf16), steps, seconds, short_conv,
                              m.loss.item(), precision, batch_size, mlp, m.stopped_at, seed, m.gate_bias_init)
                   for m in members]
    if state_path:
        mqar_state.save_results(state_path, identity, results)
    return results


def _train_in_worker(group: dict, threads: int) -> list:
    torch.set_num_threads(threads)  # the workers share the machine's cores
    return train_group(**group)


def sweep(mixers, d_models, tasks, lrs, steps, batch_size=64, vocab_size=8192, device="cpu", short_conv=False,
          jobs=1, group=1, on_run=None, log_every=0, precision="fp32", eval_every=0, stop_at=None,
          mlp="swiglu", seeds=(0,), gate_bias_inits=(0.0,), state_dir=None, save_every=0, progress=None) -> list:
    """Every (task, seed, mixer and gate bias, d_model, lr) trained once: a list of MQARResult in that order (the
    gated mixers once per bias in gate_bias_inits, the others once; gla.eval.variants).

    tasks: [(seq_len, kv_pairs), ...]. The models of a task and seed train in groups of ``group`` (lockstep, one
    data stream; on CUDA their captured steps run concurrently). jobs > 1 trains that many groups at once in
    spawned processes.
    on_run(result) sees every trained model as its group finishes, so a grid stopped midway keeps what it had.
    state_dir: each group keeps its state there (train_group's state_path, one file per group), so running the same
    grid again continues unfinished groups and returns finished ones without training them.
    progress(done, skipped=0): as in ``train_group``, in group-steps (steps per group of up to ``group`` models);
    with jobs > 1 a group's steps are told when it finishes.
    """
    groups = []
    specs = [dict(mixer=m, gate_bias_init=b, d_model=d, lr=lr)
             for m, b in mixer_variants(mixers, gate_bias_inits) for d in d_models for lr in lrs]
    for t, kv in tasks:
        for seed in seeds:
            groups += [dict(specs=specs[i:i + group], seq_len=t, kv_pairs=kv, steps=steps, batch_size=batch_size,
                            vocab_size=vocab_size, seed=seed, device=device, short_conv=short_conv,
                            log_every=log_every, precision=precision, eval_every=eval_every, stop_at=stop_at, mlp=mlp,
                            save_every=save_every, state_path=os.path.join(
                                state_dir, f"T{t}-kv{kv}-seed{seed}-group{i // group}.pt") if state_dir else None)
                       for i in range(0, len(specs), group)]
    for g in groups:  # a state saved by other grid flags fails here, before any group trains
        if g["state_path"]:
            mqar_state.load(g["state_path"], _identity(g))
    on_run = on_run or (lambda r: None)
    progress = progress or (lambda done, skipped=0: None)
    done = [None] * len(groups)  # kept in spec order, whatever order the workers finish in
    if jobs <= 1:
        for i, g in enumerate(groups):
            done[i] = train_group(**g, progress=progress)
            for r in done[i]:
                on_run(r)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            index = {pool.submit(_train_in_worker, g, threads): i for i, g in enumerate(groups)}
            for fut in as_completed(index):
                done[index[fut]] = fut.result()
                progress(steps)
                for r in done[index[fut]]:
                    on_run(r)
    return [r for rs in done for r in rs]
