import pytest


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    """~60 KB of real text (two plays of the default corpus), as a local file."""
    from gla.data import load_documents
    docs = load_documents()
    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text(docs[0][:30000] + docs[1][:30000])
    return str(path)


@pytest.fixture(scope="session")
def small_docs(tmp_path_factory):
    """A jsonl corpus of many short documents: most training windows span a document boundary."""
    import json
    from gla.data import load_documents
    text = load_documents()[2][:40000]
    docs = [text[i:i + 70] for i in range(0, len(text), 70)]
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)
