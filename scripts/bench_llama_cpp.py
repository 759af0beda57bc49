"""Time llama.cpp (through the llama-cpp-python package, which builds llama.cpp's own CPU
kernels from source on install) on the same GGUF as `cargo bench --bench model`, with the same
measurements: prefill of 512 and 2,000 tokens, 128 decode steps after a short prompt, 64 decode
steps after 2,000 tokens of context. Prints one JSON object.

    python3 scripts/bench_llama_cpp.py MODEL.gguf THREADS
"""

import json
import sys
import time

from llama_cpp import Llama


def main() -> None:
    path, threads = sys.argv[1], int(sys.argv[2])
    llm = Llama(
        model_path=path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=2304,
        n_batch=512,
        n_ubatch=512,
        logits_all=False,
        verbose=False,
    )
    text = (
        "The quick brown fox jumps over the lazy dog while the scheduler batches every "
        "agent's request into one step. "
    )
    base = llm.tokenize(text.encode(), add_bos=False)

    def tokens(n: int) -> list[int]:
        return [base[i % len(base)] for i in range(n)]

    def prefill(n: int) -> float:
        llm.reset()
        toks = tokens(n)
        t = time.perf_counter()
        llm.eval(toks)
        return n / (time.perf_counter() - t)

    def decode(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            llm.eval([504])
        return n / (time.perf_counter() - t)

    prefill(64)  # warm up
    out = {"pp512": prefill(512), "pp2000": prefill(2000)}
    out["tg_at2000"] = decode(64)
    prefill(16)
    out["tg128"] = decode(128)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
