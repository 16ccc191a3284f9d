"""`python -m pipeline search` and `python -m pipeline serve`: bad input is one line and exit status 1."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.core.config import ConfigError, load_params
from pipeline.core.io import BrokenArtifact

from .embed import SearchError, check_queries
from .index import check_k
from .gallery import GalleryError

log = logging.getLogger("pipeline.search")


def add_commands(commands) -> None:
    search = commands.add_parser("search", help="find people in a gallery from a description")
    search.add_argument("query", nargs="?", help="the description (or --queries FILE)")
    search.add_argument("--variant", default="pdg", help="the trained variant whose index answers (default pdg)")
    search.add_argument("-k", type=int, help="results per query (default: search.top_k)")
    search.add_argument("--out", help="write a PNG of the query and its top-k here")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--queries", help="a text file, one query per line: answers as JSON lines")
    search.add_argument("--gallery", help="search this folder of crops directly (exact, embedded now)")
    search.add_argument("--params", default="params.yaml")
    search.set_defaults(run=search_command)

    serve = commands.add_parser("serve", help="a local web page that searches a variant's index")
    serve.add_argument("--variant", default="pdg")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    serve.add_argument("--params", default="params.yaml")
    serve.set_defaults(run=serve_command)


def _setup() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(err: Exception) -> int:
    for line in str(err).splitlines():
        log.error("%s", line)
    return 1


def open_searcher(args: argparse.Namespace):
    from pipeline.core.devices import inference_device

    from .query import Searcher

    params = load_params(args.params)
    if getattr(args, "gallery", None):
        return params, Searcher.for_folder(params, args.variant, args.gallery, device=inference_device())
    return params, Searcher.for_variant(params, args.variant, device=inference_device())


def _read_queries(args: argparse.Namespace) -> list[str]:
    if args.queries:
        path = Path(args.queries)
        if not path.is_file():
            raise SearchError(f"--queries {path}: no such file")
        lines = [line for line in path.read_text().splitlines()]
        if not any(line.strip() for line in lines):
            raise SearchError(f"--queries {path}: no queries in it")
        return lines
    if args.query is None:
        raise SearchError("give a query (\"a woman in a red coat\") or --queries FILE")
    return [args.query]


def search_command(args: argparse.Namespace) -> int:
    from .query import format_table, plot_answer

    _setup()
    try:
        queries = _read_queries(args)
        # the checks Searcher.search makes, here before the model and index load (cheap input first)
        check_queries(queries)
        if args.k is not None:
            check_k(args.k)
        params, searcher = open_searcher(args)
        k = args.k if args.k is not None else min(params.search.top_k, len(searcher.index))
        answers = searcher.search(queries, k)
    except (SearchError, GalleryError, ConfigError, BrokenArtifact) as err:
        return _fail(err)
    if args.queries:
        for answer in answers:
            print(json.dumps(answer.to_json()))
    elif args.json:
        print(json.dumps({"index": searcher.index.describe(), **answers[0].to_json()}, indent=2))
    else:
        print(format_table(answers[0], searcher.index))
    if args.out:
        plot_answer(searcher, answers[0], args.out)
        log.info("wrote %s", args.out)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from .serve import PortInUse, make_server

    _setup()
    try:
        params, searcher = open_searcher(args)
        server = make_server(searcher, params.search.top_k, args.host, args.port)
    except (SearchError, GalleryError, ConfigError, BrokenArtifact, PortInUse) as err:
        return _fail(err)
    host, port = server.server_address[:2]
    log.info("serving %s (%s, %d images) at http://%s:%d/ (Ctrl-C stops)", searcher.index.folder,
             searcher.index.kind, len(searcher.index), host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
