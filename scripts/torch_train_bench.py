#!/usr/bin/env python3
"""Training-speed reference: the BitNet b1.58 model of crates/bitnet-training in
eager PyTorch on the CPU.

Reads the same TrainConfig JSON as `bitnet train` ({"model": ..., "recipe": ...}),
builds the same architecture, and runs optimizer steps (forward, next-token
cross-entropy, backward, grad clipping, AdamW with the two-stage / cosine
schedule) on random token windows drawn with a fixed seed.  No torch.compile.

The last line on stdout is one JSON object:
  {"engine":"pytorch","threads":T,"tokens_per_s":...,"step_ms_median":...,"steps":N,...}
where tokens_per_s = batch_size * seq_len / median step time over the steps
after the warm-up steps.  Progress and the torch version also go to stderr.

usage: torch_train_bench.py --config CONFIG.json --steps N --threads T [--warmup-steps W]
"""

import argparse
import json
import math
import statistics
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="BitNet b1.58 training speed in eager PyTorch (CPU)")
    ap.add_argument("--config", required=True, help="TrainConfig JSON ({model, recipe})")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps to run, warm-up included")
    ap.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    ap.add_argument("--warmup-steps", type=int, default=3,
                    help="leading steps left out of the timing (default 3)")
    ap.add_argument("--attention", choices=("sdpa", "math"), default="sdpa",
                    help="sdpa: F.scaled_dot_product_attention (default); math: explicit softmax")
    ap.add_argument("--seed", type=int, default=None, help="override recipe.seed")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup_steps:
        ap.error(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps})")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


ARGS = parse_args()

import torch  # noqa: E402  (imported after argument parsing so --help is fast)
import torch.nn.functional as F  # noqa: E402

# Thread settings must precede any parallel work.
torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Quantizers (BitNet b1.58), straight-through estimators
# ---------------------------------------------------------------------------

def ste(x, q):
    """Forward q, backward identity with respect to x."""
    return x + (q - x).detach()


def quant_weight(w):
    # Per-tensor absmean scale; ternary codes.
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return ste(w, torch.clamp(torch.round(w * s), -1.0, 1.0) / s)


def quant_act(x):
    # Per-token absmax scale to int8 range.
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ste(x, torch.clamp(torch.round(x * s), -128.0, 127.0) / s)


class BitLinear(torch.nn.Module):
    """Bias-free linear layer; quantized weights and inputs when `quantize`."""

    def __init__(self, in_features, out_features, quantize):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.quantize = quantize

    def forward(self, x):
        if self.quantize:
            return F.linear(quant_act(x), quant_weight(self.weight))
        return F.linear(x, self.weight)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) * w
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def rope_tables(seq_len, head_dim, theta):
    """cos/sin tables [seq_len, head_dim] in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float64)
    ang = torch.outer(pos, inv_freq)
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().float(), ang.sin().float()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    # x [b, heads, t, hd]; cos/sin [t, hd]
    return x * cos + rotate_half(x) * sin


class Block(torch.nn.Module):
    def __init__(self, m, quantize, attention):
        super().__init__()
        d = m["hidden_size"]
        f = m["intermediate_size"]
        self.n_heads = m["num_heads"]
        self.n_kv = m["num_kv_heads"]
        self.head_dim = d // self.n_heads
        kv = self.n_kv * self.head_dim
        eps = m["rms_norm_eps"]
        self.attention = attention
        self.input_layernorm = RMSNorm(d, eps)
        self.q_proj = BitLinear(d, d, quantize)
        self.k_proj = BitLinear(d, kv, quantize)
        self.v_proj = BitLinear(d, kv, quantize)
        self.attn_sub_norm = RMSNorm(d, eps)
        self.o_proj = BitLinear(d, d, quantize)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.gate_proj = BitLinear(d, f, quantize)
        self.up_proj = BitLinear(d, f, quantize)
        self.ffn_sub_norm = RMSNorm(f, eps)
        self.down_proj = BitLinear(f, d, quantize)

    def attn(self, h, cos, sin):
        b, t, d = h.shape
        hd = self.head_dim
        q = self.q_proj(h).view(b, t, self.n_heads, hd).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.n_kv, hd).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.n_kv, hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            # Query head i reads kv head i // rep.
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            mask = torch.ones(t, t, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
            o = torch.softmax(scores, dim=-1) @ v
        return o.transpose(1, 2).reshape(b, t, d)

    def forward(self, x, cos, sin):
        a = self.attn(self.input_layernorm(x), cos, sin)
        x = x + self.o_proj(self.attn_sub_norm(a))
        h = self.post_attention_layernorm(x)
        g = torch.relu(self.gate_proj(h)).square()
        x = x + self.down_proj(self.ffn_sub_norm(g * self.up_proj(h)))
        return x


class BitNetLM(torch.nn.Module):
    def __init__(self, m, quantize, attention):
        super().__init__()
        if not m.get("tie_word_embeddings", True):
            raise SystemExit("only tie_word_embeddings=true is supported (as in the Rust trainer)")
        d = m["hidden_size"]
        if d % m["num_heads"] or m["num_heads"] % m["num_kv_heads"] or (d // m["num_heads"]) % 2:
            raise SystemExit("bad head configuration")
        self.embed_tokens = torch.nn.Parameter(torch.empty(m["vocab_size"], d))
        self.layers = torch.nn.ModuleList(
            Block(m, quantize, attention) for _ in range(m["num_layers"]))
        self.norm = RMSNorm(d, m["rms_norm_eps"])
        self.head_dim = d // m["num_heads"]
        self.rope_theta = m["rope_theta"]
        self._rope = {}
        # normal(0, 0.02) for every matrix, ones for every norm weight.
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, mean=0.0, std=0.02)

    def rope(self, t):
        if t not in self._rope:
            self._rope[t] = rope_tables(t, self.head_dim, self.rope_theta)
        return self._rope[t]

    def forward(self, ids):
        cos, sin = self.rope(ids.shape[1])
        x = F.embedding(ids, self.embed_tokens)
        for blk in self.layers:
            x = blk(x, cos, sin)
        x = self.norm(x)
        return F.linear(x, self.embed_tokens)  # tied head


# ---------------------------------------------------------------------------
# Schedule (same shape as TrainRecipe::lr_wd in crates/bitnet-training)
# ---------------------------------------------------------------------------

def lr_wd(r, step):
    total = float(max(r["steps"], 1))
    s = float(step)
    lr = r["lr"]
    wd = r["weight_decay"]
    warm = r.get("warmup_steps", 0)
    if step < warm:
        return lr * (s + 1.0) / warm, wd
    kind = r.get("schedule", "two_stage")
    if kind == "two_stage":
        mid = total / 2.0
        if s < mid:
            t = min(max((s - warm) / max(mid - warm, 1.0), 0.0), 1.0)
            return lr * (1.0 + (r["lr_stage1_end"] - 1.0) * t), wd
        t = min(max((s - mid) / max(total - mid - 1.0, 1.0), 0.0), 1.0)
        f = r["lr_stage2_start"] + (r["lr_final"] - r["lr_stage2_start"]) * t
        return lr * f, 0.0
    if kind == "cosine":
        t = min(max((s - warm) / max(total - warm - 1.0, 1.0), 0.0), 1.0)
        c = 0.5 * (1.0 + math.cos(math.pi * t))
        return lr * (r["lr_final"] + (1.0 - r["lr_final"]) * c), wd
    raise SystemExit(f"unknown schedule {kind!r}")


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------

def main():
    with open(ARGS.config, "r", encoding="utf-8") as fh:
        cfg = json.load(fh)
    m = cfg["model"]
    r = dict(cfg["recipe"])
    # The schedule spans the benchmarked steps, as `bitnet train --steps N` does.
    r["steps"] = ARGS.steps
    seed = r.get("seed", 0) if ARGS.seed is None else ARGS.seed
    quantize = bool(r.get("quantize", True))
    batch, seq = r["batch_size"], r["seq_len"]
    vocab = m["vocab_size"]

    log(f"torch {torch.__version__} (threads={torch.get_num_threads()}, "
        f"interop={torch.get_num_interop_threads()})")

    torch.manual_seed(seed)
    model = BitNetLM(m, quantize, ARGS.attention)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    beta1, beta2 = r.get("beta1", 0.9), r.get("beta2", 0.95)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=r["lr"], betas=(beta1, beta2), eps=r.get("adam_eps", 1e-8),
        weight_decay=r["weight_decay"])
    clip = r.get("grad_clip", 1.0)

    # A random token stream, sampled as seq_len + 1 windows like the Rust data loader.
    gen = torch.Generator().manual_seed(seed)
    stream_len = max(1 << 20, 4 * batch * (seq + 1))
    stream = torch.randint(0, vocab, (stream_len,), generator=gen, dtype=torch.long)
    span = torch.arange(seq + 1)

    log(f"model: {n_params} params, d={m['hidden_size']} layers={m['num_layers']} "
        f"heads={m['num_heads']}/{m['num_kv_heads']} vocab={vocab} quantize={quantize}; "
        f"batch={batch} seq_len={seq}; attention={ARGS.attention}")

    times = []
    losses = []
    for step in range(ARGS.steps):
        t0 = time.perf_counter()
        starts = torch.randint(0, stream_len - seq - 1, (batch,), generator=gen)
        win = stream[starts[:, None] + span]
        inputs, targets = win[:, :-1], win[:, 1:]
        lr, wd = lr_wd(r, step)
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["weight_decay"] = wd
        opt.param_groups[1]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        loss_v = loss.item()
        dt = time.perf_counter() - t0
        times.append(dt)
        losses.append(loss_v)
        tag = " (warm-up)" if step < ARGS.warmup_steps else ""
        log(f"step {step + 1}/{ARGS.steps}: loss {loss_v:.4f} grad_norm {float(gnorm):.3f} "
            f"lr {lr:.2e} {dt * 1000:.1f} ms{tag}")
        if not math.isfinite(loss_v):
            raise SystemExit("non-finite loss")

    timed = times[ARGS.warmup_steps:]
    median = statistics.median(timed)
    tokens_per_step = batch * seq
    result = {
        "engine": "pytorch",
        "threads": ARGS.threads,
        "tokens_per_s": tokens_per_step / median,
        "step_ms_median": median * 1000.0,
        "step_ms_min": min(timed) * 1000.0,
        "steps": ARGS.steps,
        "warmup_steps": ARGS.warmup_steps,
        "tokens_per_s_mean": tokens_per_step * len(timed) / sum(timed),
        "tokens_per_step": tokens_per_step,
        "params": n_params,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "attention": ARGS.attention,
        "torch_version": torch.__version__,
    }
    print(f"torch {torch.__version__}", flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
