"""``cir query``: interactive retrieval, one modification text per line, for any trained model.

    cir query --config experiments/demos/procir.yaml --ckpt outputs/procir_demo/checkpoints/last.ckpt \\
        --images front.jpg back.jpg [--split val] [--dataset synth_studio] [-k 10] [-- --data.init_args.data_dir=...]
    query> make it red
    query> no, with long sleeves and a pocket
    query> :quit

With ``--session`` the texts are turns of one multi-turn session (``cir/query_session.py``): the
first from the --images product, each next one refining the last; ``:click N`` makes result N the
next turn's reference and ``:new`` starts over.

At the prompt, :help lists the commands, :k N changes how many results are shown and :quit (or
Ctrl-D, Ctrl-C) quits; the arrow keys edit the line and recall earlier ones (the history is kept in
~/.cache/fashion-cir/query_history). Texts piped to stdin or given with --text are answered one
after another.

Without ``--ckpt`` the command refuses to run unless ``--untrained`` asks for the experiment's
initial weights. Every file named (--config, --ckpt, --images, --products) is checked before the
model is built. The gallery of ``--split`` is embedded first. A ProCIR model with the two-stage
dialogue runs turn 1 of the source once (``InteractiveEncoder.cache_source``) and each text only runs
turn 2; every other model runs its full query forward per text. Each answer is a table of the top-k
products of the chosen dataset's gallery (rank, id, score, category and title or caption: what the
shards and ``--products``, a catalogue's products.jsonl, know) and the query latency.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_modules.core.embedding import place
from lightning_modules.families.procir import InteractiveEncoder, ProCIR

from .args import add_weights_options, command_parser, parse
from .errors import check_files, check_images, user_errors
from .models import encode_gallery_with_meta, encode_query, load_model_and_data, require_weights, resolve_device_or_exit
from .query_session import SESSION_HELP, Refused, session_of
from .search import choose_dataset

PROMPT = "query> "
DEFAULT_K = 10  # results per query, as ``cir search query -k``
HISTORY = Path.home() / ".cache" / "fashion-cir" / "query_history"
BANNER = "Type a modification text and press Enter. :help for help, :quit (or Ctrl-D) to quit."
HELP = """\
  TEXT      search the gallery for the source changed as TEXT says (e.g. "make it red")
  :k N      show N results per query (now {k})
  :help     this help
  :quit     quit (also :q, Ctrl-D, Ctrl-C)
The arrow keys edit the line and recall earlier texts."""
QUIT = ("quit", "q", "exit")
HELP_WORDS = ("help", "h", "?")
TITLE_WIDTH = 60  # a long title or caption is cut here, keeping one line per result

# A search: text and k -> (results as (id, score), best first; milliseconds the query took).
Search = Callable[[str, int], tuple[list[tuple[str, float]], float]]


def describe(meta: Mapping[str, Any], listed: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What the catalogue knows of a product, for the table: its category and its title (from
    products.jsonl) or, without one, the gallery's short caption."""
    listed = listed or {}
    category = str(listed.get("category") or meta.get("category") or "")
    title = str(listed.get("title") or meta.get("title") or meta.get("short_caption") or "")
    return {"category": category, "title": " ".join(title.split())}


def read_products(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """products.jsonl rows by product id ({} without a file); a row that does not parse is skipped:
    titles are a courtesy here, not data the answer depends on."""
    if path is None or not Path(path).is_file():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("product_id") is not None:
            rows[str(row["product_id"])] = row
    return rows


def results_table(results: Iterable[tuple[str, float]], catalogue: Mapping[str, Mapping[str, str]]) -> str:
    """rank, id, score, category and title of each result, in aligned columns; the columns the
    catalogue has nothing for are left out."""
    results = list(results)
    known = [catalogue.get(pid, {}) for pid, _ in results]
    has_category = any(k.get("category") for k in known)
    has_title = any(k.get("title") for k in known)
    id_width = max([len("id"), *(len(pid) for pid, _ in results)])
    header = f"{'rank':>4}  {'id':<{id_width}}  {'score':>7}"
    cat_width = max([len("category"), *(len(k.get("category", "")) for k in known)])
    header += f"  {'category':<{cat_width}}" if has_category else ""
    header += "  title" if has_title else ""
    lines = [header.rstrip()]
    for rank, ((pid, score), k) in enumerate(zip(results, known, strict=True), 1):
        line = f"{rank:>4}  {pid:<{id_width}}  {score:>7.4f}"
        line += f"  {k.get('category', ''):<{cat_width}}" if has_category else ""
        title = k.get("title", "")
        line += f"  {title[:TITLE_WIDTH - 1] + '…' if len(title) > TITLE_WIDTH else title}" if has_title else ""
        lines.append(line.rstrip())
    return "\n".join(lines)


def repl(search: Search, read: Callable[[str], str], catalogue: Mapping[str, Mapping[str, str]],
         k: int = DEFAULT_K, write: Callable[[str], None] = print, banner: bool = True,
         commands: Mapping[str, Callable[[str], str]] | None = None,
         heading: Callable[[str, float], str] | None = None) -> None:
    """The prompt loop: ``read(prompt)`` gives a line (EOFError at the end: Ctrl-D or no more
    input), ``search`` answers a text, ``write`` prints. ``:help``, ``:k N`` and ``:quit`` (also
    without the colon at a terminal, ``banner``: a user types ``quit``, not a modification text) are
    commands, and so is each of ``commands`` (``:word ARG`` → its message: a session's ``:click``);
    ``heading(text, ms)`` is the line above each answer. A ``Refused`` turn or command is said in
    one line and the prompt goes on. Ctrl-C quits cleanly wherever it comes, at the prompt or during a query."""
    commands = commands or {}
    if banner:
        write(BANNER + (" :click N refines the next turn from result N, :new starts over." if commands else ""))
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            if banner:
                write("")  # the shell's prompt starts on its own line after ^D / ^C
            return
        text = line.strip()
        if not text:
            continue
        word, _, arg = text.removeprefix(":").partition(" ")
        # Bare words are commands only at a terminal: a given text (--text help, a piped "q") is a query.
        command = text.startswith(":") or (banner and not arg and word.lower() in (*QUIT, *HELP_WORDS))
        if command:
            word = word.lower()
            if word in QUIT:
                return
            if word in HELP_WORDS:
                write(HELP.format(k=k) + ("\n" + SESSION_HELP if commands else ""))
            elif word in commands:
                try:
                    write(commands[word](arg))
                except Refused as error:
                    write(str(error))
            elif word == "k" and arg.strip().isdigit() and int(arg) >= 1:
                k = int(arg)
                write(f"showing {k} results per query")
            else:
                write(f"unknown command {text!r}: :help lists the commands")
            continue
        try:
            results, ms = search(text, k)
        except KeyboardInterrupt:
            if banner:
                write("")
            return
        except Refused as error:
            write(str(error))
            continue
        write(heading(text, ms) if heading else f"[{ms:.1f} ms] {text!r}")
        write(results_table(results, catalogue))


def _line_editing(history: Path | None) -> None:
    """Line editing and history for ``input()``: importing ``readline`` is what turns them on (the
    Up arrow then recalls a line instead of printing ``^[[A``). Where the module does not exist
    (Windows) or the history file cannot be used, the prompt still works, without them."""
    try:
        import readline
    except ImportError:
        return
    if history is None:
        return
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.is_file():
            readline.read_history_file(history)
    except OSError:
        return
    readline.set_history_length(1000)
    import atexit

    def save() -> None:
        try:
            readline.write_history_file(history)
        except OSError:
            pass  # a read-only home: the session simply keeps no history

    atexit.register(save)


def _lines(texts: Iterable[str]) -> Callable[[str], str]:
    """A ``read`` over given texts (--text, or stdin when it is not a terminal), without a prompt."""
    it: Iterator[str] = iter(texts)

    def read(_: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def main(argv: list[str] | None = None) -> None:
    p = command_parser("query", __doc__)
    add_weights_options(p, "answer with")
    p.add_argument("--images", nargs="+", required=True, help="the source product's views")
    p.add_argument("--split", default="val", help="split whose gallery is searched")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available) for the model")
    p.add_argument("--dataset", default=None, help="the gallery searched (needed when the split holds several)")
    p.add_argument("-k", type=int, default=DEFAULT_K, help=f"results per query (default {DEFAULT_K}; :k N at the "
                   "prompt changes it)")
    p.add_argument("--text", action="append", help="modification texts (default: read lines from stdin)")
    p.add_argument("--session", action="store_true",
                   help="the texts are turns of one session, each refining the last (:click N at the prompt makes "
                        "result N the next turn's reference, :new starts over)")
    p.add_argument("--products", default=None,
                   help="a catalogue's products.jsonl, for titles and categories in the results (default: "
                   "products.jsonl in the shard folder, when there is one)")
    args, extra = parse(p, argv, passthrough=True)
    if args.k < 1:
        p.error(f"-k {args.k}: at least 1")
    prog = "cir query"
    with user_errors(prog):
        require_weights(prog, args.ckpt, args.untrained)
        check_files(prog, [("--config", c) for c in args.config] + [("--products", args.products)])
        check_images(prog, args.images)
        _run(args, extra)


def _run(args: Any, extra: list[str]) -> None:
    if not args.text and sys.stdin.isatty():  # the model and gallery take a while: say so, and how to stop
        print("cir query: loading the model and embedding the gallery (Ctrl-C stops)…", flush=True)
    device = resolve_device_or_exit("cir query", args.device)
    model, dm = load_model_and_data(args.config, args.ckpt, extra, prog="cir query")
    place(model, device)
    known = getattr(dm, "datasets", None)  # from the manifest: a missing --dataset is refused before embedding
    if isinstance(known, list) and known:
        choose_dataset(known, args.dataset, "cir query")
    gallery, ids, datasets, metas = encode_gallery_with_meta(model, dm, args.split)
    dataset = choose_dataset(datasets, args.dataset, "cir query")
    rows = torch.tensor([d == dataset for d in datasets])
    keep = rows.tolist()
    gallery = gallery[rows]
    ids = [i for i, kept in zip(ids, keep, strict=True) if kept]
    metas = [m for m, kept in zip(metas, keep, strict=True) if kept]
    listed = read_products(args.products or Path(dm.data_dir) / "products.jsonl")
    catalogue = {pid: describe(meta, listed.get(pid)) for pid, meta in zip(ids, metas, strict=True)}

    def rank(q: torch.Tensor, k: int) -> list[tuple[str, float]]:
        scores, idx = torch.topk(gallery.to(q.device) @ q, min(k, len(ids)))
        return [(ids[i], s) for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]

    interactive = not args.text and sys.stdin.isatty()
    if interactive:
        _line_editing(HISTORY)
        read: Callable[[str], str] = input
    else:
        read = _lines(args.text or (line.rstrip("\n") for line in sys.stdin))
    if args.session:
        conversation, how = session_of(model, dm, args.images, args.split, dataset, rank)
        print(f"gallery: {len(ids)} products of {dataset}; session: {how}", flush=True)
        repl(conversation, read, catalogue, args.k, write=lambda s: print(s, flush=True), banner=interactive,
             commands={"click": conversation.click, "new": conversation.new}, heading=conversation.heading)
        return
    t0 = time.perf_counter()
    if isinstance(model, ProCIR) and model.two_stage_dialogue:
        encoder = InteractiveEncoder(model)
        cache = encoder.cache_source(args.images)
        how = f"source cached: {cache.tokens} tokens in {1000 * (time.perf_counter() - t0):.1f} ms"
        embed: Callable[[str], torch.Tensor] = lambda text: encoder.encode_query(None, text, cache=cache)  # noqa: E731
    else:
        how = "no cache for this model: each text runs the full query forward"
        embed = lambda text: encode_query(model, dm, args.images, text)[0]  # noqa: E731

    def search(text: str, k: int) -> tuple[list[tuple[str, float]], float]:
        t0 = time.perf_counter()
        results = rank(embed(text), k)
        return results, 1000 * (time.perf_counter() - t0)

    print(f"gallery: {len(ids)} products of {dataset}; {how}", flush=True)
    repl(search, read, catalogue, args.k, write=lambda s: print(s, flush=True), banner=interactive)
