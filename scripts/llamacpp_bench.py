#!/usr/bin/env python3
"""llama.cpp side of scripts/bench_vs_llamacpp.sh: pp/tg tokens per second of a GGUF
model through llama-cpp-python, measured the way `bitnet bench` measures ours.

usage: llamacpp_bench.py --model FILE [--threads T] [-p 128] [-n 64] [--reps R]
                         [--flash-attn off|on] [--tg-prefix K] [--tg-feed fixed|argmax]
       llamacpp_bench.py --self-test      (checks the helpers; needs no llama_cpp)

Prints one JSON line on stdout (all other output, llama.cpp's included, goes to
stderr) with `engine`, `threads`, `pp_tokens_per_s`, `tg_tokens_per_s` (medians),
`pp`/`tg` ({median, min, max}), and the llama.cpp / llama-cpp-python versions.

What is timed, in the manner of `bitnet bench` (crates/bitnet-inference/src/bench.rs)
and of llama.cpp's own llama-bench:

* pp: one llama_decode of `p` random token ids (no BOS: the first id is as random as
  the rest) from an empty KV cache, i.e. `Llama.eval(ids)` with n_batch = n_ubatch >= p
  so that eval issues exactly one decode call. Logits are computed for the last token
  only (logits_all=False): llama-bench and `bitnet bench` do the same. The same ids are
  used for every rep.
* tg: `n` single-token decodes from an empty KV cache (or after an untimed prefix of
  `--tg-prefix` tokens), each one `Llama.eval([id])` followed by llama_synchronize, as
  llama-bench's test_gen. Default `--tg-feed fixed` feeds a fixed list of random ids, so
  no sampler runs at all (as in `bitnet bench`); `--tg-feed argmax` instead feeds the
  argmax of the previous step's logits (a greedy "sampler" on the host, about 0.1 ms per
  token for a 128k vocabulary, which the timing includes).
* Each phase runs reps + 1 times; the first (untimed) run of each faults the weights in
  and sizes llama.cpp's buffers. The KV cache is cleared before every run.

The Python overhead per `eval` call (a ctypes batch fill of 1 or p tokens) is tens of
microseconds, against tens of milliseconds per token for a 2B model.
"""

import argparse
import inspect
import json
import os
import statistics
import sys
import time

# llama.cpp commit vendored by each llama-cpp-python release we have checked
# (from the release's CHANGELOG); llama_version() itself only says e.g. "0.5.0-dev".
VENDORED_LLAMA_CPP = {
    "0.3.36": "ggml-org/llama.cpp@0c1e57098",
}


def bench_ids(n, vocab, seed=0x9E3779B97F4A7C15):
    """`n` deterministic pseudo-random token ids in [0, vocab) (xorshift64)."""
    mask = (1 << 64) - 1
    s = seed & mask
    out = []
    for _ in range(n):
        s ^= (s << 13) & mask
        s ^= s >> 7
        s ^= (s << 17) & mask
        out.append(s % vocab)
    return out


def rate_summary(rates):
    """Median (mean of the middle two for an even count), min and max, or None."""
    if not rates:
        return None
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
    }


def round_up(x, m):
    return (x + m - 1) // m * m


def self_test():
    ids = bench_ids(1000, 7)
    assert len(ids) == 1000 and all(0 <= i < 7 for i in ids) and len(set(ids)) == 7
    assert bench_ids(5, 128256) == bench_ids(5, 128256)
    r = rate_summary([3.0, 1.0, 2.0])
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)
    assert rate_summary([4.0, 1.0, 2.0, 3.0])["median"] == 2.5
    assert rate_summary([]) is None
    assert round_up(200, 256) == 256 and round_up(256, 256) == 256
    print(json.dumps({"self_test": "ok"}))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-p", "--prompt", type=int, default=128, help="prompt tokens (0 skips pp)")
    ap.add_argument("-n", "--gen", type=int, default=64, help="generated tokens (0 skips tg)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of each phase")
    ap.add_argument("--flash-attn", choices=["off", "on"], default="off",
                    help="llama.cpp flash attention (llama-cpp-python's default: off)")
    ap.add_argument("--tg-prefix", type=int, default=0,
                    help="untimed prompt tokens decoded before each tg run (default 0: "
                         "tg from an empty cache, as bitnet bench and llama-bench)")
    ap.add_argument("--tg-feed", choices=["fixed", "argmax"], default="fixed",
                    help="token fed at each tg step: fixed random ids, or the argmax of "
                         "the previous logits")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args(argv)
    if not a.self_test:
        if not a.model:
            ap.error("--model is required")
        if a.threads < 1 or a.reps < 1 or a.prompt < 0 or a.gen < 0 or a.tg_prefix < 0:
            ap.error("--threads and --reps must be >= 1; -p, -n, --tg-prefix >= 0")
    return a


class Engine:
    """A llama_cpp.Llama plus the few low-level calls the benchmark needs, each looked
    up by name so that releases that renamed or lack one still work."""

    def __init__(self, llama_cpp, a):
        self.lc = llama_cpp
        # n_batch = n_ubatch = n_ctx: the prompt is one decode call and one micro-batch,
        # and releases whose eval() stores the last row of logits at index
        # n_past + n_tokens - 1 of an n_batch-row array never index past it.
        self.n_ctx = round_up(max(256, a.prompt + 8, a.tg_prefix + a.gen + 8), 256)
        want = {
            "model_path": a.model,
            "n_gpu_layers": 0,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_ctx,
            "n_ubatch": self.n_ctx,
            "n_threads": a.threads,
            "n_threads_batch": a.threads,
            "logits_all": False,
            "use_mmap": True,
            "use_mlock": False,
            "flash_attn": a.flash_attn == "on",
            "verbose": False,
        }
        # Llama(**kwargs) swallows unknown keywords in recent releases; pass only the
        # named parameters this release has, and say which were not.
        params = inspect.signature(llama_cpp.Llama.__init__).parameters
        kwargs = {k: v for k, v in want.items() if k in params}
        self.dropped = sorted(set(want) - set(kwargs))
        if "model_path" not in kwargs:
            raise SystemExit("llama_cpp.Llama has no model_path parameter; unsupported release")
        if self.dropped:
            print(f"note: this llama-cpp-python has no Llama({', '.join(self.dropped)}=...); "
                  "left at its defaults", file=sys.stderr)
        t = time.perf_counter()
        self.llm = llama_cpp.Llama(**kwargs)
        self.load_s = time.perf_counter() - t
        self.ctx = getattr(self.llm, "ctx", None)
        if self.ctx is None:
            self.ctx = self.llm._ctx.ctx
        self.n_vocab = self.llm.n_vocab()
        self.n_batch = getattr(self.llm, "n_batch", None)

    def call(self, name, *args, default=None):
        f = getattr(self.lc, name, None)
        return f(*args) if f is not None else default

    def context_info(self):
        model = getattr(self.llm, "model", None)
        desc = None
        if model is not None and hasattr(self.lc, "llama_model_desc"):
            import ctypes
            buf = ctypes.create_string_buffer(256)
            self.lc.llama_model_desc(model, buf, 256)
            desc = buf.value.decode("utf-8", "replace")
        return {
            "model_desc": desc,
            "n_ctx": self.call("llama_n_ctx", self.ctx, default=self.n_ctx),
            "n_batch": self.call("llama_n_batch", self.ctx, default=self.n_batch),
            "n_ubatch": self.call("llama_n_ubatch", self.ctx),
            "n_threads": self.call("llama_n_threads", self.ctx),
            "n_threads_batch": self.call("llama_n_threads_batch", self.ctx),
        }

    def clear(self):
        """Empties the KV cache and the wrapper's token count."""
        self.llm.reset()  # n_tokens = 0 (eval then also drops cache cells from 0 on)
        internal = getattr(self.llm, "_ctx", None)
        if internal is not None and hasattr(internal, "kv_cache_clear"):
            internal.kv_cache_clear()
            return
        mem = self.call("llama_get_memory", self.ctx)
        if mem is not None and hasattr(self.lc, "llama_memory_clear"):
            self.lc.llama_memory_clear(mem, True)
            return
        for name in ("llama_kv_self_clear", "llama_kv_cache_clear"):
            if hasattr(self.lc, name):
                getattr(self.lc, name)(self.ctx)
                return

    def sync(self):
        # The CPU backend computes synchronously; this is for exactness (as llama-bench).
        self.call("llama_synchronize", self.ctx)

    def decode(self, ids):
        self.llm.eval(ids)
        self.sync()

    def argmax_last(self):
        import numpy as np
        ptr = self.call("llama_get_logits_ith", self.ctx, -1)
        if ptr is None:
            ptr = self.lc.llama_get_logits(self.ctx)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())


def versions(llama_cpp):
    py_ver = getattr(llama_cpp, "__version__", "unknown")
    core = None
    if hasattr(llama_cpp, "llama_version"):
        try:
            v = llama_cpp.llama_version()
            core = v.decode() if isinstance(v, bytes) else str(v)
        except Exception:  # older shared libraries lack the symbol
            core = None
    vendored = VENDORED_LLAMA_CPP.get(py_ver)
    parts = [core or "version unknown"]
    if vendored:
        parts.append(vendored)
    parts.append(f"via llama-cpp-python {py_ver}")
    sysinfo = None
    if hasattr(llama_cpp, "llama_print_system_info"):
        s = llama_cpp.llama_print_system_info()
        sysinfo = (s.decode() if isinstance(s, bytes) else str(s)).strip()
    return {
        "llama_cpp_version": " ".join(parts),
        "llama_cpp_python_version": py_ver,
        "llama_cpp_commit": vendored,
        "system_info": sysinfo,
    }


def run(a):
    # Keep stdout for the one JSON line: anything llama.cpp or the wrapper prints goes to
    # stderr while the model runs.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        try:
            import llama_cpp
        except ImportError as e:
            raise SystemExit(f"cannot import llama_cpp ({e}); run scripts/bench_vs_llamacpp.sh "
                             "to build it into target/llamacpp-venv")
        eng = Engine(llama_cpp, a)
        if a.prompt > 0 and eng.n_batch is not None and a.prompt > eng.n_batch:
            raise SystemExit(f"n_batch {eng.n_batch} < {a.prompt}: pp would be split")
        info = eng.context_info()
        if info["n_threads"] not in (None, a.threads) or \
                info["n_threads_batch"] not in (None, a.threads):
            raise SystemExit(f"llama.cpp context has {info['n_threads']}/"
                             f"{info['n_threads_batch']} threads, asked {a.threads}")
        prompt = bench_ids(a.prompt, eng.n_vocab)
        prefix = bench_ids(a.tg_prefix, eng.n_vocab, seed=0xD1B54A32D192ED03)
        gen = bench_ids(a.gen, eng.n_vocab, seed=0x94D049BB133111EB)

        def pp_rate():
            eng.clear()
            t = time.perf_counter()
            eng.decode(prompt)
            return len(prompt) / (time.perf_counter() - t)

        def tg_rate():
            eng.clear()
            if prefix:
                eng.decode(prefix)  # untimed
            tok = gen[0]
            t = time.perf_counter()
            for i in range(len(gen)):
                eng.decode([tok])
                if i + 1 < len(gen):
                    tok = eng.argmax_last() if a.tg_feed == "argmax" else gen[i + 1]
            return len(gen) / (time.perf_counter() - t)

        pp, tg = [], []
        for rep in range(a.reps + 1):  # rep 0: untimed warm-up of each phase
            if a.prompt > 0:
                r = pp_rate()
                if rep > 0:
                    pp.append(r)
            if a.gen > 0:
                r = tg_rate()
                if rep > 0:
                    tg.append(r)
        eng.clear()
        pps, tgs = rate_summary(pp), rate_summary(tg)
        out = {
            "engine": "llama.cpp",
            **versions(llama_cpp),
            "model": a.model,
            "threads": a.threads,
            "prompt_tokens": a.prompt,
            "gen_tokens": a.gen,
            "reps": a.reps,
            "pp_tokens_per_s": pps["median"] if pps else None,
            "tg_tokens_per_s": tgs["median"] if tgs else None,
            "pp": pps,
            "tg": tgs,
            "tg_prefix": a.tg_prefix,
            "tg_feed": a.tg_feed,
            "flash_attn": a.flash_attn,
            "load_s": eng.load_s,
            "n_vocab": eng.n_vocab,
            "llama_params_missing": eng.dropped,
            **info,
        }
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    print(json.dumps(out), flush=True)


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.self_test:
        self_test()
    else:
        run(a)


if __name__ == "__main__":
    main()
