"""Memory of `regla chat` over a long scripted conversation (MLX): the recurrent state of a
linearized model stays the same size however long the chat runs; a softmax model's KV cache grows.

    python bench/chat_memory.py --model smol-regla-mlx --turns 200
    python bench/chat_memory.py --model smol-regla-mlx --compare smol-softmax-mlx --turns 200

Runs the same ``ChatSession`` that `regla chat` runs (chat template, one cache for the whole
conversation, greedy answers of at most --max-tokens) and prints, at a few turns: the tokens the
conversation holds, the bytes of the model's cache (state or KV), MLX's active and cached memory,
and the process's resident memory (RSS).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROMPTS = ["What is the capital of France?", "Tell me a short story about a cat.", "How do I sort a list in Python?",
           "Why is the sky blue?", "Give me three tips for sleeping well.", "What is 17 times 23?",
           "Summarise our conversation so far in one sentence.", "Write a haiku about rain.",
           "What did I ask you first?", "Explain recursion to a child."]


def rss_bytes() -> int:
    """Resident memory now: /proc on Linux; on macOS the peak (ru_maxrss), which can only grow."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def cache_bytes(cache) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for c in cache for _, v in tree_flatten(c.state) if hasattr(v, "nbytes"))


def measure(path: str, turns: int, max_tokens: int, marks: set) -> list:
    import mlx.core as mx

    import regla_mlx

    model, tok = regla_mlx.load(path)
    session = regla_mlx.ChatSession(model, tok, max_tokens, {"temp": 0.0})
    if not session.use_template:
        sys.exit(f"{path} has no chat template: the measure is of a chat")
    rows, start = [], time.perf_counter()
    for t in range(1, turns + 1):
        session.ask(PROMPTS[(t - 1) % len(PROMPTS)])
        if t in marks:
            mx.eval([c.state for c in session.cache])
            rows.append({"turn": t, "tokens": len(session.tokens), "cache": cache_bytes(session.cache),
                         "active": mx.get_active_memory(), "mlx_cache": mx.get_cache_memory(),
                         "peak": mx.get_peak_memory(), "rss": rss_bytes(), "seconds": time.perf_counter() - start})
            print(f"  {path}: turn {t}, {rows[-1]['tokens']} tokens, {rows[-1]['seconds']:.0f} s", file=sys.stderr,
                  flush=True)
    return rows


def table(name: str, rows: list) -> str:
    mib = 2.0 ** 20
    out = [f"`{name}`", "", "| turn | tokens in the conversation | model cache | MLX active | MLX cache pool | "
           "RSS | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['turn']} | {r['tokens']:,} | {r['cache'] / mib:.2f} MiB | {r['active'] / mib:.1f} MiB | "
                   f"{r['mlx_cache'] / mib:.1f} MiB | {r['rss'] / mib:.0f} MiB | {r['seconds']:.0f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="MLX folder of a linearized model (with a chat template)")
    ap.add_argument("--compare", help="another MLX folder, e.g. the same teacher kept all softmax")
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=24, help="most tokens per answer")
    a = ap.parse_args()
    marks = {1, 10, 25, 50, 100, 150, a.turns} & set(range(1, a.turns + 1))
    for path in [a.model] + ([a.compare] if a.compare else []):
        print(table(path, measure(path, a.turns, a.max_tokens, marks)) + "\n", flush=True)


if __name__ == "__main__":
    main()
