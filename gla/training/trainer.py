"""The training loop behind `gla train`: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast (on GPUs
and on CPUs with fast bf16 matmuls), non-finite steps skipped (a run of them stops training: Diverged), periodic
validation, atomic checkpoints with exact resume (bit-exact in eager mode; compiled kernels do not sum in a fixed
order), data parallelism, torch.compile.

Every optimizer step draws `batch_size` random windows of seq_len + 1 tokens from one data generator shared by all
ranks (same seed, same draws); rank r of W takes its slice of each micro-step. The loss is the token-level mean over
the whole global batch, so one process and W processes with the same global batch take the same steps.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from gla.data import (IGNORE_INDEX, encode_documents, load_documents, load_tokenizer, make_batch, sample_offsets,
                      split_stream)
from gla.device import BF16_MIN_SPEEDUP, cpu_bf16_speedup
from gla.models.transformer import partitioning
from . import checkpoint, distributed, report
from .config import TrainConfig, lr_at


EVAL_TOKENS = 16384
"""Tokens per forward of ``Trainer.evaluate`` (at least one micro-batch): at nanoGPT's recipe (20 batches of 12 x 64
tokens) 20 forwards of 12 windows took 188 ms, one of 240 windows 150 ms (a 2-core Xeon); a GPU run of 340M at
T=2048 keeps its forwards of 8 windows."""


PLOT_EVERY_S = 60.0
"""loss.png is redrawn at an evaluation at most this often (and at the end): a drawing took 0.09 s plus 0.3 s of
matplotlib's import on a 2-core Xeon, 1.2 of the 70 s of nanoGPT's recipe when drawn at each of its 9 evaluations."""


class Diverged(RuntimeError):
    """Training stopped: ``TrainConfig.nonfinite_limit`` steps in a row had a non-finite loss or gradient norm."""


def resume_config(out: str, overrides: dict) -> TrainConfig:
    """The saved settings of the run in `out`, with explicitly given flags on top (e.g. more --steps)."""
    ckpt = checkpoint.find(out)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out!r}")
    saved = checkpoint.read_train_config(ckpt)
    if "gate_bias_init" in overrides:  # it only sets starting weights, which the checkpoint replaces
        from gla.models import GLAConfig
        before = saved.get("gate_bias_init")
        before = GLAConfig.preset(saved.get("preset", "demo")).gate_bias_init if before is None else before
        if overrides["gate_bias_init"] != before:
            raise ValueError(f"--resume: --gate-bias-init sets the starting weights, which the checkpoint fixes "
                             f"(this run started from {before}, got {overrides['gate_bias_init']})")
    if saved.get("tokenizer") not in (None, "bytes"):
        saved["tokenizer"] = os.path.join(ckpt, saved["tokenizer"])
    if "tokenizer" in overrides and not _same_tokenizer(overrides["tokenizer"], saved.get("tokenizer")):
        raise ValueError(f"--tokenizer {overrides['tokenizer']!r}: the run in {out!r} was trained with another "
                         f"tokenizer ({saved.get('tokenizer') or 'bytes'}), which its embeddings are tied to; resume "
                         "without --tokenizer, or start a new run (another --out)")
    return TrainConfig.from_dict({**saved, **overrides, "out": out})


def _same_tokenizer(a: str | None, b: str | None) -> bool:
    """Whether two --tokenizer values name the same tokenizer: both 'bytes' (or unset), or tokenizer.json files
    (given directly or as the folder holding one) with the same contents."""
    a, b = (x or "bytes" for x in (a, b))
    if "bytes" in (a, b):
        return a == b
    a, b = (os.path.join(x, "tokenizer.json") if os.path.isdir(x) else x for x in (a, b))
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError as e:
        raise ValueError(f"--tokenizer {a!r} cannot be read ({e.strerror or e})") from None


def model_config(cfg: TrainConfig, vocab_size: int):
    """The preset's GLAConfig with the flags on top; a new --d-model without --d-ff gets the preset rule's
    SwiGLU width for that model size."""
    from gla.models import GLAConfig
    from gla.models.config import ffn_size
    base = GLAConfig.preset(cfg.preset)
    over = cfg.model_overrides()
    if "d_model" in over and "d_ff" not in over:
        over["d_ff"] = ffn_size(over["d_model"])
    return GLAConfig.preset(cfg.preset, vocab_size=vocab_size, max_seq_len=max(base.max_seq_len, cfg.seq_len), **over)


def _param_groups(model, weight_decay: float):
    """Weight decay on matrices (embeddings, projections), none on norms, biases and gate vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _say(d, msg: str):
    if d.main:
        report.say(msg)


class Trainer:
    """Build with a TrainConfig (resume=True continues the run in cfg.out), then call fit()."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.d, self.device = distributed.setup(cfg.parallel, cfg.device)
        d = self.d
        micro = cfg.batch_size // cfg.grad_accum
        if micro % d.world:
            raise ValueError(f"--batch-size {cfg.batch_size} / --grad-accum {cfg.grad_accum} = {micro} sequences "
                             f"per micro-step is not divisible by the {d.world} processes")
        self.micro = micro // d.world
        if not resume and checkpoint.find(cfg.out) is not None:
            raise FileExistsError(f"{cfg.out!r} already holds a checkpoint: pass --resume to continue it, "
                                  "or choose another --out")
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        try:
            self.train_data, self.val_data = split_stream(
                encode_documents(load_documents(cfg.data), self.tokenizer), cfg.val_fraction)
        except ValueError as e:  # name the argument to fix
            raise ValueError(f"--data {cfg.data!r}: {e}") from None
        fits = min(len(self.train_data), len(self.val_data)) - 2  # a window is seq_len + 1 tokens at >= 1 offset
        if cfg.seq_len > fits:  # before the model is built
            raise ValueError(f"--seq-len {cfg.seq_len}: --data {cfg.data!r} holds {len(self.train_data):,} training "
                             f"and {len(self.val_data):,} validation tokens (--val-fraction {cfg.val_fraction:g}), "
                             f"too few for one window; use --seq-len {fits} or less, or more data"
                             if fits >= 1 else
                             f"--data {cfg.data!r}: {len(self.train_data) + len(self.val_data)} tokens are too few "
                             f"to train on; use more data")
        torch.manual_seed(cfg.seed)            # same initial weights on every rank
        init = self._init_model(resume) if cfg.init_from else None
        self.model_cfg = init.config if init is not None else model_config(cfg, self.tokenizer.vocab_size)
        self.plain = checkpoint.build_model(self.model_cfg).to(self.device)
        if init is not None and not resume:
            self.plain.load_state_dict(init.state_dict())
        self.teacher = self._teacher() if cfg.teacher and (cfg.kl_weight or cfg.transfer_steps) else None
        if self.teacher is not None and cfg.transfer_steps and not resume:
            self._transfer()
        if cfg.lora:  # after stage 1 (which refits whole projections); a resume loads the adapters in _restore
            from gla.distill.lora import add_lora
            add_lora(self.plain, cfg.lora)
        # Each layer and the fused head + loss compiled on its own, before the distributed wrapper hooks them:
        # compile time stays seconds at any depth (the whole 24-layer model took 132 s on an H100). Parameters,
        # checkpoints, evaluation and sampling are unchanged.
        self.plain.checkpoint_layers = cfg.checkpoint_activations
        if cfg.compile == "on" or (cfg.compile == "auto" and self.device.type == "cuda"):
            self.plain.compile_blocks()
        elif cfg.memory_budget < 1:
            raise ValueError("--memory-budget applies to compiled layers: add --compile on (auto compiles on CUDA)")
        if cfg.memory_budget < 1 and self.plain.config.dropout > 0:
            # what the partitioner recomputes draws new dropout masks: the backward would not match the forward
            raise ValueError("--memory-budget below 1 cannot recompute dropout with the forward's masks: "
                             "add --dropout 0, or keep every activation (--memory-budget 1)")
        self.model = distributed.wrap(self.plain, d, self.device)
        # fused on the CPU too: at nanoGPT's recipe 31.0 against 33.5 ms per step for the for-loop default
        # (benchmarks/NOTES.md), and the compiled run's curve still within 3e-4 of eager's
        fused = self.device.type in ("cuda", "cpu")
        self.opt = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), fused=fused or None)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16(d))
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout masks differ per rank
        self.step, self.train_time, self.skipped = 0, 0.0, 0
        self.bad_run, self.last_finite = 0, None  # non-finite steps in a row; (step, loss) of the last finite one
        self.saved_step = None  # step of the checkpoint in cfg.out
        self.first_step = 0  # the step this process started from (a resume's checkpoint)
        os.makedirs(cfg.out, exist_ok=True)
        if resume:
            self._restore()
        elif d.main:
            open(os.path.join(cfg.out, report.METRICS), "w").close()

    # ---------------------------------------------------------------- distillation
    def _init_model(self, resume: bool):
        """The model that --init-from names (on resume, the checkpoint's own architecture)."""
        import dataclasses

        from gla.models import from_pretrained
        src = checkpoint.find(self.cfg.out) if resume else self.cfg.init_from
        model = from_pretrained(src)
        if self.tokenizer.vocab_size > model.config.vocab_size:  # padded embeddings (Qwen's) may be larger
            raise ValueError(f"{src}: the model's vocabulary has {model.config.vocab_size} entries, the tokenizer "
                             f"{self.tokenizer.vocab_size}; pass the model's --tokenizer")
        model.config = dataclasses.replace(model.config, max_seq_len=max(model.config.max_seq_len,
                                                                         self.cfg.seq_len))
        return model

    def _teacher(self):
        from gla.distill.transfer import load_teacher
        teacher = load_teacher(self.cfg.teacher).to(self.device)
        if teacher.config.vocab_size != self.model_cfg.vocab_size:
            raise ValueError(f"--teacher {self.cfg.teacher}: vocabulary {teacher.config.vocab_size}, the model's "
                             f"is {self.model_cfg.vocab_size}")
        return teacher

    def _transfer(self):
        """Stage 1 on training windows drawn from their own generator (the training stream is unchanged)."""
        from gla.distill.transfer import attention_transfer
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed + 2)

        def batches():
            for _ in range(cfg.transfer_steps):
                b = make_batch(self.train_data, sample_offsets(self.train_data, cfg.seq_len, self.micro, gen),
                               cfg.seq_len)
                yield {"input_ids": b["input_ids"].to(self.device),
                       "cu_seqlens": None if b["cu_seqlens"] is None else b["cu_seqlens"].to(self.device)}
        first, last = attention_transfer(self.plain, self.teacher, batches(), cfg.lr,
                                         log=(lambda m: _say(self.d, m)) if self.progress else None)
        _say(self.d, f"attention transfer: output error {first:.4f} -> {last:.4f} in {cfg.transfer_steps} steps")

    # ---------------------------------------------------------------- checkpoints
    def _restore(self):
        ckpt = checkpoint.find(self.cfg.out)
        st = checkpoint.restore(ckpt, self.model, self.opt)
        self.step, self.train_time, self.skipped = int(st["step"]), float(st["train_time"]), int(st["skipped"])
        self.data_gen.set_state(st["data_rng"])
        rng = st["rng"]
        if len(rng["torch"]) == self.d.world:   # same world size: every rank continues its own dropout stream
            torch.set_rng_state(rng["torch"][self.d.rank])
            if self.device.type == "cuda" and rng["cuda"]:
                torch.cuda.set_rng_state(rng["cuda"][self.d.rank], self.device)
        else:
            _say(self.d, f"resuming on {self.d.world} processes from {len(rng['torch'])}: dropout RNG reseeded")
        if self.step >= self.cfg.steps:  # checked before the run's files are touched
            raise ValueError(f"--resume: {self.cfg.out!r} is at step {self.step}, so --steps {self.cfg.steps} leaves "
                             "nothing to train; pass a larger --steps")
        if self.d.main:
            report.truncate_metrics(self.cfg.out, self.step)
        self.saved_step = self.first_step = self.step
        _say(self.d, f"resumed {self.cfg.out} at step {self.step}")

    def save(self):
        if self.bad_run:  # the run may be diverging: keep the checkpoint written before it
            _say(self.d, f"warning: step {self.step}: no checkpoint while steps are non-finite")
            return
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        mine = {"torch": torch.get_rng_state(), "cuda": cuda}
        ranks = self.d.gather_objects(mine)
        state = {"step": self.step, "train_time": self.train_time, "skipped": self.skipped,
                 "data_rng": self.data_gen.get_state(),
                 "rng": {"torch": [r["torch"] for r in ranks],
                         "cuda": [r["cuda"] for r in ranks] if cuda is not None else []}}
        plain = None if self.d.parallel == "fsdp" else self.plain
        checkpoint.save(self.cfg.out, self.model, plain, self.opt, state, self.cfg.to_dict(), self.tokenizer,
                        self.d)
        self.saved_step = self.step

    # ---------------------------------------------------------------- steps
    def _inputs(self, batch):
        """(input_ids [B, T], targets [B, T], cu_seqlens or None) of one micro-batch, on the device."""
        cu = batch["cu_seqlens"]
        return (batch["input_ids"].to(self.device, non_blocking=True),
                batch["targets"].to(self.device, non_blocking=True), None if cu is None else cu.to(self.device))

    def _bf16(self, d) -> bool:
        """Whether the step runs under bf16 autocast: --dtype bf16; with auto, on CUDA, and on a CPU whose bf16
        matmuls measure BF16_MIN_SPEEDUP times faster than fp32 (on every rank: the ranks must agree)."""
        cfg = self.cfg
        if cfg.dtype != "auto" or self.device.type != "cpu":
            return cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        speedup = cpu_bf16_speedup()
        fast = d.sum(torch.tensor(float(speedup >= BF16_MIN_SPEEDUP))).item() == d.world
        if d.main:
            print(f"--dtype auto: {'bf16 autocast' if fast else 'fp32'} on this CPU (its bf16 matmuls ran "
                  f"{speedup:.1f}x the fp32 speed; bf16 from {BF16_MIN_SPEEDUP}x)", file=sys.stderr)
        return fast

    @staticmethod
    def _ce(logits, y) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def _nll(self, batch) -> torch.Tensor:
        """Summed next-token negative log-likelihood (nats) of one micro-batch, through the model's fused head and
        loss (no [B, T, vocab] logits kept)."""
        x, y, cu = self._inputs(batch)
        with self.autocast:
            nll, _ = self.model(x, cu_seqlens=cu, use_cache=False, targets=y, ignore_index=IGNORE_INDEX)
        return nll

    def _loss(self, batch) -> torch.Tensor:
        """The training objective of one micro-batch: the summed next-token loss, plus kl_weight times the summed
        KL(teacher || model) when distilling."""
        if self.teacher is None or not self.cfg.kl_weight:
            return self._nll(batch)
        from gla.distill.transfer import kl_sum
        x, y, cu = self._inputs(batch)
        with self.autocast:
            logits, _ = self.model(x, cu_seqlens=cu, use_cache=False)
        with torch.no_grad(), self.autocast:
            teacher_logits, _ = self.teacher(x, cu_seqlens=cu, use_cache=False)
        return self._ce(logits, y) + self.cfg.kl_weight * kl_sum(logits, teacher_logits, y, IGNORE_INDEX)

    def train_step(self) -> dict:
        cfg, d = self.cfg, self.d
        offsets = sample_offsets(self.train_data, cfg.seq_len, cfg.batch_size, self.data_gen)
        offsets = offsets.view(cfg.grad_accum, d.world, self.micro)[:, d.rank]
        batches = [make_batch(self.train_data, o, cfg.seq_len) for o in offsets]
        count = d.sum(torch.tensor(float(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches))))
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        scale = distributed.loss_scale(d) / max(float(count), 1.0)
        total = torch.zeros((), device=self.device)
        # read when a compiled layer's first training call partitions its graph into forward and backward
        with partitioning(cfg.memory_budget):
            for i, b in enumerate(batches):
                with distributed.grad_sync(self.model, d, i == len(batches) - 1):
                    nll = self._loss(b)
                    (nll * scale).backward()
                total += nll.detach()
        total = d.sum(total)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # one read-back per step, for both values (the skip below needs them on the host)
        loss_sum, norm = torch.stack([total.float(), norm.float().to(total.device)]).tolist()
        loss = loss_sum / max(float(count), 1.0)
        if math.isfinite(loss) and math.isfinite(norm):
            self.opt.step()
            self.bad_run, self.last_finite = 0, (self.step + 1, loss)
        else:
            self.skipped += 1
            self.bad_run += 1
            _say(d, f"warning: step {self.step + 1}: non-finite loss ({loss}) or gradient norm ({norm}); "
                    "update skipped")
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm}

    def _diverged_message(self) -> str:
        cfg = self.cfg
        if self.last_finite:
            last = f"the last finite loss was {self.last_finite[1]:.4f} at step {self.last_finite[0]}"
        else:  # not kept in checkpoints: a resumed run knows only its own steps
            last = f"no finite step since step {self.first_step}"
        kept = (f"the checkpoint of step {self.saved_step} in {cfg.out} is intact" if self.saved_step is not None
                else "no checkpoint was written")
        why = (f"{cfg.nonfinite_limit} in a row, --nonfinite-limit" if self.bad_run >= cfg.nonfinite_limit
               else "the run ended on them")
        clip = (f" or clip gradients (--grad-clip 1.0, now {cfg.grad_clip:g})"
                if cfg.grad_clip == 0 or cfg.grad_clip > 1 else "")
        return (f"training diverged: steps {self.step - self.bad_run + 1}-{self.step} had a non-finite loss or "
                f"gradient norm ({why}); {last}; {kept}. Lower --lr (now {cfg.lr:g}){clip}.")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss (nats/token) over eval_batches * batch_size fixed random windows."""
        cfg, d = self.cfg, self.d
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same windows at every evaluation
        # eval_batches global batches of windows, whatever the accumulation or number of processes; each forward
        # takes as many micro-batches as fit EVAL_TOKENS (without gradients a forward keeps no activations)
        n = cfg.eval_batches * cfg.batch_size
        micro_batches = n // (d.world * self.micro)
        per = max(m for m in range(1, micro_batches + 1)
                  if micro_batches % m == 0 and (m == 1 or m * self.micro * cfg.seq_len <= EVAL_TOKENS))
        offsets = sample_offsets(self.val_data, cfg.seq_len, n, gen).view(-1, d.world, self.micro * per)
        self.model.eval()
        total, count = torch.zeros(()), torch.zeros(())
        for o in offsets[:, d.rank]:
            b = make_batch(self.val_data, o, cfg.seq_len)
            total += self._nll(b).cpu()
            count += (b["targets"] != IGNORE_INDEX).sum()
        self.model.train()
        return float(d.sum(total)) / max(float(d.sum(count)), 1.0)

    def samples(self, n: int = 2) -> list[str]:
        """Text continuing the first 32 validation tokens, temperature 0.8 (all ranks under FSDP)."""
        from gla.generation import generate
        model = self.model if self.d.parallel == "fsdp" else self.plain
        prompt = self.val_data.tokens[:32].unsqueeze(0).repeat(n, 1).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        # eager: compiled layers would recompile for every prompt length and for the one-token steps
        with self.autocast, torch.compiler.set_stance("force_eager"):
            # no CUDA graph: an FSDP model gathers its weights in hooks that a graph cannot replay
            out = generate(model, prompt, self.cfg.sample_tokens, temperature=0.8, generator=gen, cuda_graph=False)
        return [self.tokenizer.decode(row.tolist()) for row in out.cpu()]

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        from tqdm import tqdm
        cfg, d = self.cfg, self.d
        ckpt_every = cfg.ckpt_every or cfg.eval_every
        tokens_per_step = cfg.batch_size * cfg.seq_len
        n_params = sum(p.numel() for p in self.model.parameters())  # DTensor numel is the global size
        _say(d, f"gla train: {n_params / 1e6:.2f}M parameters, {len(self.train_data):,} train / "
                f"{len(self.val_data):,} val tokens, {d.world} process(es) on {self.device}, out {cfg.out}")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (d.main and self.progress), unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        self.model.train()
        val_loss, last = None, {}
        t_log, step_log = time.perf_counter(), self.step
        plotted = t_log  # when loss.png was last drawn
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            last = self.train_step()
            self.train_time += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                rate = (self.step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
                t_log, step_log = now, self.step
                if d.main:
                    report.append_metrics(cfg.out, {**last, "tok_per_s": round(rate, 1),
                                                    "time": round(self.train_time, 3)})
            # the limit reached, or the run's last step non-finite (its checkpoint would not be written)
            if self.bad_run >= cfg.nonfinite_limit or (self.bad_run and self.step == cfg.steps):
                bar.close()
                raise Diverged(self._diverged_message())
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                val_loss = self.evaluate()
                _say(d, f"step {self.step}: train loss {last['loss']:.4f}, val loss {val_loss:.4f}, "
                        f"{self.train_time:.1f}s")
                if d.main:
                    report.append_metrics(cfg.out, {"step": self.step, "val_loss": val_loss,
                                                    "time": round(self.train_time, 3)})
                    if time.perf_counter() - plotted >= PLOT_EVERY_S:
                        report.plot_loss(cfg.out)
                        plotted = time.perf_counter()
            if self.step % ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        summary = {"out": cfg.out, "step": self.step, "loss": last.get("loss"), "val_loss": val_loss,
                   "train_time_s": round(self.train_time, 2), "skipped_steps": self.skipped,
                   "tok_per_s": round(self.step * tokens_per_step / max(self.train_time, 1e-9), 1),
                   "params": n_params}
        if self.device.type == "cuda":   # this rank's peak: shows what FSDP's sharding saves per GPU
            summary["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        if cfg.sample_tokens and (d.main or d.parallel == "fsdp"):
            texts = self.samples()
            if d.main:
                summary["samples"] = report.write_samples(cfg.out, texts)
                summary["sample"] = texts[0]
        if d.main:
            summary["plot"] = report.plot_loss(cfg.out)
        d.barrier()
        return summary


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) training; returns a summary (out, step, loss, val_loss, train_time_s, plot, ...)."""
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown(trainer.d)
