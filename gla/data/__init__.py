"""Data: tokenizers, corpora, packing with document boundaries, the train/validation split."""
from .corpus import CORPUS_LICENSE, DEFAULT_CORPUS, load_documents
from .packing import (IGNORE_INDEX, TokenStream, encode_documents, eval_windows, make_batch, sample_offsets,
                      split_stream)
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_for

__all__ = ["CORPUS_LICENSE", "DEFAULT_CORPUS", "load_documents", "IGNORE_INDEX", "TokenStream", "encode_documents",
           "eval_windows", "make_batch", "sample_offsets", "split_stream", "ByteTokenizer", "HFTokenizer",
           "load_tokenizer", "tokenizer_for"]
