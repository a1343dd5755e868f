"""The training corpus: files, the token-length index, documents and the data position.

Documents come from local files through HF ``datasets`` (parquet, jsonl/json, txt: one
file, a directory, a glob or a list, as ``data_files``; or a directory written by
``save_to_disk``), a named text column, tokenised without special tokens (as upstream
ReFINE: raw text, no BOS), truncated to ``data.max_length``.

At corpus scale nothing is read into Python lists: the files are converted once into
datasets' Arrow cache and memory-mapped (:mod:`.files`), the token count of every row is
computed once per (file contents, tokenizer) by ``Dataset.map(num_proc=...)`` and cached
beside it (:mod:`.index`), the driver keeps only that ``[rows]`` integer index (the
:class:`DataCursor`), and each scorer reads only the rows it is given (:class:`Corpus`).
Cache location and clearing: README.md and docs/performance.md ("Data at corpus scale").
"""
from refine_ray.data.corpus import Corpus, DataCursor, Document, truncate
from refine_ray.data.files import DataError, content_key, data_files, load_tokenizer, locate_row, open_dataset
from refine_ray.data.index import CorpusIndex, corpus_index, first_answer, tokenizer_key

__all__ = ["Corpus", "CorpusIndex", "DataCursor", "DataError", "Document", "content_key", "corpus_index",
           "data_files", "first_answer", "load_tokenizer", "locate_row", "open_dataset", "tokenizer_key",
           "truncate"]
