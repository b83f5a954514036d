"""llama.cpp (llama-cpp-python) as the bench's CPU peer, in a process of its own so that a crash in
one of its paths costs the bench one row, not the run.

`python -m bench.llamacpp_runner --model F.gguf --threads N` loads the model (mmap), prints
`{"ready": true, "version": ...}` and then answers one JSON line per JSON line read from stdin:

- `{"op": "load"}`: loads the file again into a second, minimal model (n_ctx 64), times it, frees it.
- `{"op": "prefill", "tokens": [...]}`: a fresh sequence (KV cache cleared) of these tokens.
- `{"op": "context", "tokens": [...]}`: untimed, fills the KV cache with these tokens.
- `{"op": "step", "token": t}`: one decode step after the context; the token's KV entry is dropped
  again by the next step (llama-cpp-python's eval clears the cache from n_tokens on), so every step
  attends over the same context.
- `{"op": "greedy", "tokens": [...], "n": k}`: k greedy tokens after a fresh prompt (argmax of the
  logits), for the correctness check against our model.
- `{"op": "quit"}`.

Timed answers are `{"seconds": s}`, measured here around the llama.cpp call alone; errors
`{"error": "..."}`. `python -m bench.llamacpp_runner --convert SRC DST FTYPE` writes a re-quantized
GGUF (`llama_model_quantize`, ftype 0 = all F32, 7 = Q8_0) and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

N_CTX = 1024  # as our bench KV cache: twice the decode context
LOAD_N_CTX = 64  # the Load figure is about the weights (as ours: LOAD_KV)


def new_llama(path: str, threads: int, n_ctx: int) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=True,
        verbose=False,
    )


def last_logits(llm: Any) -> Any:
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def convert(src: str, dst: str, ftype: int) -> int:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


class Runner:
    def __init__(self, path: str, threads: int) -> None:
        self.path = path
        self.threads = threads
        self.llm = new_llama(path, threads, N_CTX)
        self.context = 0  # tokens in the KV cache before each step

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "load":
            start = time.perf_counter()
            other = new_llama(self.path, self.threads, LOAD_N_CTX)
            seconds = time.perf_counter() - start
            other.close()
            return {"seconds": seconds}
        if op == "prefill":
            self.llm.reset()
            start = time.perf_counter()
            self.llm.eval(msg["tokens"])
            seconds = time.perf_counter() - start
            self.context = 0  # the cache no longer holds the decode context
            return {"seconds": seconds}
        if op == "context":
            self.llm.reset()
            self.llm.eval(msg["tokens"])
            self.context = len(msg["tokens"])
            return {"tokens": self.context}
        if op == "step":
            if self.context == 0:
                return {"error": "step before context"}
            self.llm.n_tokens = self.context
            start = time.perf_counter()
            self.llm.eval([msg["token"]])
            return {"seconds": time.perf_counter() - start}
        if op == "greedy":
            self.llm.reset()
            self.context = 0
            tokens = list(msg["tokens"])
            out: list[int] = []
            self.llm.eval(tokens)
            for _ in range(msg["n"]):
                out.append(int(last_logits(self.llm).argmax()))
                self.llm.eval(out[-1:])
            return {"tokens": out}
        return {"error": f"unknown op {op!r}"}


def serve(path: str, threads: int) -> int:
    import llama_cpp

    runner = Runner(path, threads)
    print(json.dumps({"ready": True, "version": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("op") == "quit":
            break
        print(json.dumps(runner.handle(msg)), flush=True)
    runner.llm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llamacpp_runner")
    parser.add_argument("--model", help="GGUF file to serve")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--convert", nargs=3, metavar=("SRC", "DST", "FTYPE"))
    args = parser.parse_args(argv)
    if args.convert:
        src, dst, ftype = args.convert
        return convert(src, dst, int(ftype))
    if not args.model:
        parser.error("--model or --convert is required")
    return serve(args.model, args.threads)


if __name__ == "__main__":
    sys.exit(main())
