"""lm-evaluation-harness adapter: its HFLM wrapper over our Hugging Face class (gla.models.hf.GLAForCausalLM).

    gla eval harness --ckpt runs/demo --text my_corpus.txt        # a local text file as a rolling-loglikelihood task
    gla eval harness --ckpt runs/demo --tasks lambada_openai        # any lm-eval task (needs its dataset)

Needs the `eval` extra (pip install "gla[eval]"). Works offline: a local text file becomes a custom task
(output_type loglikelihood_rolling over paragraphs, metrics word/byte perplexity and bits per byte), read with the
`text` builder that ships inside `datasets`.
"""
from __future__ import annotations

import os
import tempfile

TASK_YAML = """task: {name}
dataset_path: text
dataset_kwargs:
  data_files:
    test: {path}
  sample_by: paragraph
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _byte_vocab() -> dict:
    """Byte-level BPE's printable stand-ins for the 256 bytes (Radford et al. 2019), mapped to ids = byte values,
    so the Hugging Face tokenizer gives exactly gla's byte tokenizer ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {chr(b if b in keep else next(shifted)): b for b in range(256)}


def hf_tokenizer(model_dir: str):
    """A transformers tokenizer equal to the one the checkpoint was trained with (bytes or its tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gla.data.tokenizers import HFTokenizer, tokenizer_for

    tok = tokenizer_for(model_dir)
    if isinstance(tok, HFTokenizer):
        return PreTrainedTokenizerFast(tokenizer_file=tok.path)
    t = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t)


def make_lm(ckpt: str, batch_size: int = 1, device: str = "cpu", max_length: int = 2048):
    """lm-eval's HFLM over our checkpoint. Rolling log-likelihoods condition each document's first token on a
    prefix token: the tokenizer's BOS/EOS if it has one, else the newline byte (a document starts a line)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError('the lm-eval adapter needs lm-evaluation-harness: pip install "gla[eval]"') from e
    from transformers import AutoModelForCausalLM

    import gla  # noqa: F401  (registers model_type "gla_lm" with transformers)

    model = AutoModelForCausalLM.from_pretrained(ckpt).to(device).eval()
    tok = hf_tokenizer(ckpt)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        prefix = tok.convert_tokens_to_ids(tok.tokenize("\n"))[0]
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device, max_length=max_length,
                prefix_token_id=prefix)


def evaluate(ckpt: str, tasks=None, text: str | None = None, limit: int | None = None, batch_size: int = 1,
             device: str = "cpu", max_length: int = 2048) -> dict:
    """Run lm-eval tasks (names) and/or a local text file as a task; returns lm-eval's results per task."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = list(tasks or [])
    with tempfile.TemporaryDirectory() as tmp:
        include = None
        if text is not None:
            if not os.path.isfile(text):
                raise FileNotFoundError(f"--text file not found: {text}")
            name = "gla_text_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(text))
            with open(os.path.join(tmp, f"{name}.yaml"), "w") as f:
                f.write(TASK_YAML.format(name=name, path=os.path.abspath(text)))
            tasks.append(name)
            include = tmp
        if not tasks:
            raise ValueError("give --tasks and/or --text")
        out = simple_evaluate(model=make_lm(ckpt, batch_size, device, max_length), tasks=tasks, limit=limit,
                              task_manager=TaskManager(include_path=include))
    return out["results"]
