"""Sources, bad-row reports, packing, mixtures, determinism and exact resumption."""

import gzip
import json

import numpy as np
import pytest

from jaxlm.data.config import DataConfig
from jaxlm.data.pipeline import TrainData, counters, eval_batches
from jaxlm.data.sources import DataError, JsonlSource, lm_validator, open_source
from jaxlm.data.tokenizer import load_tokenizer

TOK = "asset:tiny_bpe.json"


def spec(sources, **data):
    """(sources, data section) of a test stream."""
    return sources, DataConfig(**data)


def train_data(spec_, batch_size, num_shards, seed):
    sources, data = spec_
    return TrainData(data, sources, load_tokenizer(TOK), batch_size, num_shards, seed)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def texts(n, seed=0, words=(3, 40)):
    rng = np.random.default_rng(seed)
    vocab = "the king queen lord love night day sword crown sea storm ghost".split()
    return [" ".join(rng.choice(vocab, rng.integers(*words))) for _ in range(n)]


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    p = tmp_path / "mixed.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "a good line"}\n')
        f.write(b'{"text": "broken\n')                   # 2 malformed JSON
        f.write(b'{"title": "no text"}\n')               # 3 missing field
        f.write(b'{"text": "   "}\n')                    # 4 empty text
        f.write(b'{"text": "caf\xe9"}\n')                # 5 non-UTF-8 (latin-1 byte)
        f.write(b'[1, 2]\n')                             # 6 not an object
        f.write(b'\n')                                   # blank: not a record
        f.write(b'{"text": "another good one"}\n')       # 8
    src = JsonlSource([p], lm_validator())
    assert len(src) == 2 and [src[i]["_origin"] for i in range(2)] == [f"{p}:1", f"{p}:8"]
    r = src.report
    assert r.good == 2 and dict(r.bad) == {"malformed JSON": 1, "missing field": 1, "empty text": 1,
                                           "non-UTF-8": 1, "not an object": 1}
    assert r.examples["missing field"] == [f"{p}:3"] and r.examples["non-UTF-8"][0].startswith(f"{p}:5")
    text = "\n".join(r.lines())
    assert f"{p}:2" in text and f"{p}:4" in text

    cfg = spec(str(p), seq_len=32, max_bad_fraction=0.5)
    with pytest.raises(DataError, match="71.4% of records are bad, more than data.max_bad_fraction=50.0%"):
        train_data(cfg, 2, 1, 0)


def test_gzip_parquet_and_arrayrecord_read_the_same_records(tmp_path):
    rows = [{"text": t, "family": "x"} for t in texts(20)]
    plain = write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "a.arrayrecord"), "group_size:1")
    for r in rows:
        w.write(json.dumps(r).encode())
    w.write(b"\xff not json")  # a bad record, found lazily
    w.close()
    srcs = [open_source(str(tmp_path / n), lm_validator()) for n in ("a.jsonl", "a.jsonl.gz", "a.parquet", "a.arrayrecord")]
    for s in srcs[:3]:
        assert [s[i]["text"] for i in range(len(s))] == [r["text"] for r in rows]
    ar = srcs[3]
    assert [ar[i]["text"] for i in range(20)] == [r["text"] for r in rows]
    assert ar[20]["_bad"] == "non-UTF-8"
    # the lazily found bad record is counted by the pipeline
    data = train_data(spec(f"arrayrecord:{tmp_path}/a.arrayrecord", seq_len=32), 2, 1, 0)
    it = data.iterator()
    for _ in range(30):
        next(it)
    c = counters(it.get_state())
    assert c["bad"] == {"non-UTF-8": c["bad"]["non-UTF-8"]} and c["bad"]["non-UTF-8"] >= 1
    assert c["bad_examples"]["non-UTF-8"][0].endswith("#20")


def test_packing_rebuilds_every_document(tmp_path, tok):
    docs = texts(30, seed=1, words=(3, 20))  # all shorter than a row: none is split
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    cfg = spec(str(src), seq_len=48, packing_bins=4, prefetch=0)
    it = train_data(cfg, 4, 1, seed=3).iterator()
    want = {tuple(tok.encode(t) + [tok.eos_id]) for t in docs}
    seen = set()
    for _ in range(6):
        b = next(it)
        for r in range(4):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            assert (b["loss_mask"][r][seg == 0] == 0).all() and (b["tokens"][r][seg == 0] == 0).all()
            for s in set(seg.tolist()) - {0}:
                idx = np.nonzero(seg == s)[0]
                assert (pos[idx] == np.arange(len(idx))).all()
                toks, tgts, mask = b["tokens"][r][idx], b["targets"][r][idx], b["loss_mask"][r][idx]
                assert tuple(toks) in want
                assert (tgts[:-1] == toks[1:]).all() and mask[-1] == 0 and mask[:-1].all()
                seen.add(tuple(toks))
    assert len(seen) >= 20


@pytest.mark.parametrize("mode", ["split", "truncate"])
def test_long_records_split_or_truncate(tmp_path, tok, mode):
    long_text = " ".join(texts(40, seed=2))
    ids = tok.encode(long_text) + [tok.eos_id]
    src = write_jsonl(tmp_path / "long.jsonl", [{"text": long_text}])
    cfg = spec(str(src), seq_len=32, long_records=mode, packing_bins=1, prefetch=0)
    it = train_data(cfg, 1, 1, seed=0).iterator()
    rows = [next(it) for _ in range(len(ids) // 32 + 1)]
    c = counters(it.get_state())
    assert c[mode if mode == "split" else "truncated"] >= 1
    first = rows[0]
    assert (first["tokens"][0] == ids[:32]).all()
    if mode == "split":
        # the chunk's last target is the next chunk's first token: no prediction is lost at the cut
        assert first["targets"][0][-1] == ids[32] and first["loss_mask"][0][-1] == 1
        assert (rows[1]["tokens"][0] == ids[32:64]).all()
    else:
        assert (rows[1]["tokens"][0] == ids[:32]).all()  # next epoch: the same truncated record again


def test_same_seed_same_batches_and_exact_resume():
    cfg = spec("asset:shakespeare/train.jsonl", seq_len=64, packing_bins=4, prefetch=2)
    data = train_data(cfg, 4, 2, seed=7)
    a, b = data.iterator(), data.iterator()
    for _ in range(5):
        x, y = next(a), next(b)
        assert all((x[k] == y[k]).all() for k in x)
    state = a.get_state()
    after = [next(a) for _ in range(4)]
    c = train_data(cfg, 4, 2, seed=7).iterator()
    c.set_state(json.loads(json.dumps(state)))  # what a checkpoint stores
    for want in after:
        got = next(c)
        assert all((got[k] == want[k]).all() for k in want)
    other = train_data(cfg, 4, 2, seed=8).iterator()
    assert not (next(other)["tokens"] == next(train_data(cfg, 4, 2, seed=7).iterator())["tokens"]).all()
    for i in (a, b, c, other):
        i.close()


def test_batches_do_not_depend_on_the_process_count():
    cfg = spec("asset:shakespeare/train.jsonl", seq_len=64, packing_bins=2, prefetch=0)
    data = train_data(cfg, 4, num_shards=2, seed=1)
    one, p0, p1 = data.iterator(0, 1), data.iterator(0, 2), data.iterator(1, 2)
    for _ in range(3):
        full, a, b = next(one), next(p0), next(p1)
        assert (full["tokens"] == np.concatenate([a["tokens"], b["tokens"]])).all()


def test_mixture_weights_are_token_shares(tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": t} for t in texts(200, 3, (2, 6))])
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": t} for t in texts(200, 4, (30, 60))])
    cfg = spec(f"{short}@0.75, {long}@0.25", seq_len=64, prefetch=0)
    it = train_data(cfg, 8, 1, seed=0).iterator()
    for _ in range(60):
        next(it)
    tokens = counters(it.get_state())["tokens"]
    assert abs(tokens[0] / sum(tokens) - 0.75) < 0.05


def test_chat_records_train_on_assistant_turns_only(tmp_path, tok):
    chats = [{"messages": [{"role": "user", "content": "who art thou"},
                           {"role": "assistant", "content": "the king of the sea"}]}] * 4
    chats.append({"messages": [{"role": "user", "content": "no reply"}]})  # bad: nothing to learn
    src = write_jsonl(tmp_path / "chat.jsonl", chats)
    cfg = spec(str(src), seq_len=64, prefetch=0, max_bad_fraction=0.3)
    data = train_data(cfg, 1, 1, seed=0)
    assert dict(data.reports[0].bad) == {"bad messages": 1}
    b = next(data.iterator())
    seg = b["segment_ids"][0]
    idx = np.nonzero(seg == 1)[0]
    learned = b["targets"][0][idx][b["loss_mask"][0][idx] == 1]
    assert tok.decode(learned) == "the king of the sea<|end|>"


def test_eval_batches_cover_everything_once_with_groups(tmp_path, tok):
    rows = [{"text": t, "family": f} for t, f in zip(texts(9, 5), "ab" * 5)]
    src = write_jsonl(tmp_path / "e.jsonl", rows)
    cfg = spec(str(src), seq_len=64)
    total = {0: 0, 1: 0}
    for batch, groups in eval_batches(cfg[1], cfg[0], tok, 4, group_field="family"):  # noqa: B007
        for g in (0, 1):
            total[g] += int(((batch["group"] == g) & (batch["segment_ids"] > 0)).sum())
    want = {"a": 0, "b": 0}
    for r in rows:
        want[r["family"]] += len(tok.encode(r["text"])) + 1
    assert groups == {"a": 0, "b": 1} and total == {0: want["a"], 1: want["b"]}
