"""The `modelworker` command (also `python -m worker`).

modelworker serve [--config worker.toml] [--preload ID=DIR ...] [flags]
modelworker import-gguf FILE OUT_DIR [--dtype float32|bfloat16]
modelworker prepare-demo OUT_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .logs import LOGGER_NAME, configure_logging, fields
from .settings import LOG_FORMATS, LOG_LEVELS, Settings, SettingsError, build_settings, effective_threads

log = logging.getLogger(LOGGER_NAME)

# Subcommands implemented by registry.gguf_import; their arguments are passed through untouched.
GGUF_COMMANDS = {"import-gguf": "main_import", "prepare-demo": "main_prepare_demo"}
GGUF_MODULE = "registry.gguf_import"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelworker", description="gRPC model-serving worker for LLM inference"
    )
    parser.add_argument("--version", action="version", version=f"modelworker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve the ModelWorker gRPC API",
        description="Serve the ModelWorker gRPC API. Flags override MODELWORKER_* environment variables, "
        "which override the --config TOML file.",
    )
    serve.add_argument("--config", help="TOML file of settings (keys as the flags, with underscores)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", help="gRPC port (default 50051; 0 picks a free one and logs it)")
    serve.add_argument("--metrics-port", help="Prometheus port (default 9400; 0 turns metrics off)")
    serve.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    serve.add_argument("--dtype", help="auto | float32 | float16 | bfloat16 (default auto)")
    serve.add_argument("--model-root", action="append", dest="model_roots", metavar="DIR", help="repeatable")
    serve.add_argument("--preload", action="append", metavar="ID=DIR", help="load at start (repeatable)")
    serve.add_argument("--max-message-bytes", help="largest request or response, e.g. 256MiB")
    serve.add_argument("--grace-seconds", help="time in-flight calls get at shutdown (default 20)")
    serve.add_argument("--auth-token", help="require 'authorization: Bearer TOKEN' (health stays open)")
    serve.add_argument("--tls-cert", help="PEM certificate chain (TLS)")
    serve.add_argument("--tls-key", help="PEM private key (TLS)")
    serve.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates (mutual TLS)")
    serve.add_argument("--log-level", help=f"{' | '.join(LOG_LEVELS)} (default info)")
    serve.add_argument("--log-format", help=f"{' | '.join(LOG_FORMATS)} (default text)")
    serve.add_argument("--max-tokens-per-request", help="cap on tokens in one Forward (default 16384)")
    serve.add_argument("--max-batch-size", help="cap on sequences in one Forward (default 256)")
    serve.add_argument("--memory-budget-bytes", help="cap on weights + KV cache of all models (default: off)")
    serve.add_argument("--tensor-parallel-size", help="ranks one model is sharded over (default 1)")
    serve.add_argument("--nnodes", help="hosts of the tensor-parallel group (default 1)")
    serve.add_argument("--node-rank", help="this host's index; hosts > 0 serve no gRPC (default 0)")
    serve.add_argument("--master-addr", help="rank 0's address for the group (default 127.0.0.1)")
    serve.add_argument("--master-port", help="rendezvous port (default: a free one on one host)")
    serve.add_argument(
        "--load-mode", help="mmap | copy: CPU weights mapped from the checkpoint or read in (default mmap)"
    )
    serve.add_argument(
        "--cpu-gemm",
        help="auto | torch | onednn | GEMV+GEMM (mv+torch, mv+onednn, onednn+torch, torch+onednn): the matmul kernels "
        "of CPU float32 layers (default auto: the fastest measured on this host)",
    )
    serve.add_argument(
        "--threads", help="torch intra-op threads (default: $OMP_NUM_THREADS, else the usable cores)"
    )
    serve.add_argument(
        "--max-call-bytes", help="cap on one ForwardPaged call's working memory (default 4GiB)"
    )
    serve.add_argument("--load-threads", help="threads that run Loads, apart from forwards (default 2)")
    for name, func in GGUF_COMMANDS.items():
        sub.add_parser(
            name, help=f"see `modelworker {name} --help` (registry.gguf_import.{func})", add_help=False
        )
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def settings_from_args(
    args: argparse.Namespace, env: os._Environ[str] | dict[str, str] | None = None
) -> Settings:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return build_settings(flags, os.environ if env is None else env, args.config)


async def _serve(settings: Settings) -> int:
    from .server import WorkerServer, build_registry

    group = None
    if settings.tensor_parallel_size > 1:  # followers first: rank 0's registry builds shards
        from .tensor_parallel import TensorParallelGroup

        group = TensorParallelGroup(settings)
    registry = build_registry(settings)
    if group is not None:
        group.wrap_registry(registry)
    server = WorkerServer(settings, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if group is not None:
        from .tensor_parallel import RankMemoryCollector

        server.metrics.registry.register(RankMemoryCollector(group.local_ranks))
        group.on_failure(lambda: asyncio.run_coroutine_threadsafe(server.refuse_calls(), loop))
    # SIGHUP and SIGQUIT drain like SIGTERM (no call is cut short by a closing terminal or a stray
    # signal); SIGUSR1/SIGUSR2 are logged and ignored.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        loop.add_signal_handler(sig, _on_stop_signal, sig, stop)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(sig, lambda s=sig: log.warning("ignoring %s", signal.Signals(s).name))
    await server.start(serving=not settings.preload)
    exit_code = 0
    preload: asyncio.Future[bool] | None = None
    if settings.preload:
        preload = asyncio.ensure_future(server.preload())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([preload, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if preload.done():
            if preload.result():
                await server.set_serving()
            else:
                exit_code = 1
                stop.set()
    await stop.wait()
    log.info("shutting down", extra=fields(grace_s=settings.grace_seconds))
    if preload is not None and not preload.done():
        preload.cancel()  # the load itself finishes in its thread; stop() then unloads it
    await server.stop()
    if group is not None:
        group.shutdown()
    # Threads that may never end: do not let interpreter exit join them. A tensor-parallel rank 0
    # exits the same way, as its followers do: the interpreter's teardown of the distributed state
    # aborted it now and then ("terminate called without an active exception", 3 of 70 runs of
    # test_two_hosts_form_one_group), turning a clean stop into exit code -6.
    if server.left_work_running or group is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


def _on_stop_signal(sig: int, stop: asyncio.Event) -> None:
    if not stop.is_set():
        log.info("received %s; draining", signal.Signals(sig).name)
    stop.set()


def serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"modelworker serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # The effective settings, once, at start (operations asks "what is it running with?"; token masked).
    log.info("starting modelworker %s", __version__, extra=fields(**settings.redacted()))
    import torch

    torch.set_num_threads(effective_threads(settings.threads))
    if settings.node_rank > 0:  # another host of a tensor-parallel group: its ranks, no gRPC
        from .tensor_parallel import serve_followers

        return serve_followers(settings)
    try:
        return asyncio.run(_serve(settings))
    except OSError as exc:
        log.error("%s", exc)
        return 1


def run_gguf_command(command: str, argv: Sequence[str]) -> int:
    """Hand the arguments to registry.gguf_import, imported only now (it needs the gguf package)."""
    func_name = GGUF_COMMANDS[command]
    if importlib.util.find_spec(GGUF_MODULE) is None:
        print(
            f"modelworker {command}: GGUF import is not available in this installation "
            f"({GGUF_MODULE} is missing)",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(GGUF_MODULE)
    func = getattr(module, func_name, None)
    if func is None:
        print(f"modelworker {command}: {GGUF_MODULE} has no {func_name}()", file=sys.stderr)
        return 2
    return int(func(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in GGUF_COMMANDS:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return run_gguf_command(argv[0], argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser; the usage that helps is the subcommand's
        sub = _subparser(parser, args.command)
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        return serve(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
