"""Training tasks (forgetful.loss.tasks) and loss-mask builders (forgetful.loss.masks)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from datasets import Dataset

from forgetful.data.embedded import pretraining_segments
from forgetful.data.embedded_tofu import tofu_splits
from forgetful.errors import ForgetfulError
from forgetful.loss.masks import completion_only, fact_spans, goldfish_mask, merge_spans, random_mask, span_mask
from forgetful.loss.tasks import TASKS, prepare_dataset_for_training, register_task

NUM_AUTHORS = 5


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return tiny_llama[1]


def _prompt_ids(tok, question: str) -> list[int]:
    """open-unlearning's plain template (the tiny tokenizer has no chat template): the prompt ends
    with a lone space token, which the full text merges into the first answer word, so the unscored
    prefix is one token shorter than the prompt, and the merged first answer token is unscored."""
    return tok(f"Question: {question}\nAnswer: ")["input_ids"][:-1]


def _answer_enc(tok, question: str, answer: str):
    """The answer tokens of the full text (the first one merged with the prompt's space and
    unscored), with offsets relative to the answer."""
    prompt = f"Question: {question}\nAnswer: "
    enc = tok(prompt + answer, return_offsets_mapping=True)
    n = len(_prompt_ids(tok, question))
    offsets = [(s - len(prompt), e - len(prompt)) for s, e in enc["offset_mapping"][n:]]
    return {"input_ids": enc["input_ids"][n:], "offset_mapping": offsets}


def _completion_enc(tok, completion: str):
    """The completion task's answer tokens: " " + completion, encoded apart from the prompt."""
    return tok(" " + completion, add_special_tokens=False, return_offsets_mapping=True)


def _trained_text(tok, ids, mask) -> str:
    return tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)


def _overlaps(offset, spans) -> bool:
    s, e = offset
    return any(s < fe and fs < e for fs, fe in spans)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_builtin_tasks_registered():
    assert {"embedded", "text", "completion", "tofu"} <= set(TASKS)


def test_unknown_task_lists_registered(tok):
    with pytest.raises(
        ForgetfulError, match=r"unknown task 'nope'; registered tasks: .*completion.*embedded.*text.*tofu"
    ):
        prepare_dataset_for_training("nope", tok)


def test_unknown_option_lists_valid_ones(tok):
    with pytest.raises(
        ForgetfulError, match=r"task 'tofu' has no option\(s\) bogus, zz; its options: source, split,.*strategy"
    ):
        prepare_dataset_for_training("tofu", tok, bogus=1, zz=2)
    with pytest.raises(ForgetfulError, match=r"task 'text' has no option\(s\) strategy; its options: .*packing"):
        prepare_dataset_for_training("text", tok, strategy="random")


def test_register_task_decorator(tok):
    try:

        @register_task("test-echo")
        def echo(tokenizer, *, n: int = 2):
            ids = [[tokenizer.bos_token_id, tokenizer.eos_token_id]] * n
            return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1, 1]] * n, "loss_mask": [[0, 1]] * n})

        assert TASKS["test-echo"] is echo
        ds = prepare_dataset_for_training("test-echo", tok, n=3)
        assert len(ds) == 3 and ds[0]["loss_mask"] == [0, 1]
        with pytest.raises(ForgetfulError, match=r"has no option\(s\) m; its options: n"):
            prepare_dataset_for_training("test-echo", tok, m=1)
        with pytest.raises(ForgetfulError, match="task 'test-echo' produced no training rows"):
            prepare_dataset_for_training("test-echo", tok, n=0)

        @register_task("test-kwargs")
        def anything(tokenizer, **options):  # **options: every option is passed through
            return Dataset.from_dict({"input_ids": [[1]], "attention_mask": [[1]], "loss_mask": [[len(options)]]})

        assert prepare_dataset_for_training("test-kwargs", tok, a=1, b=2)[0]["loss_mask"] == [2]
    finally:
        TASKS.pop("test-echo", None)
        TASKS.pop("test-kwargs", None)


# --------------------------------------------------------------------------------------------
# The tofu task on the embedded data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tofu_rows():
    splits = tofu_splits(NUM_AUTHORS, seed=0)
    forget = {(r["question"], r["answer"]) for r in splits["forget10"]}
    return splits["full"], forget


def _tofu(tok, strategy, **kw):
    return prepare_dataset_for_training("tofu", tok, split="full", strategy=strategy, num_authors=NUM_AUTHORS, **kw)


@pytest.fixture(scope="module")
def answer_only(tok):
    return _tofu(tok, "answer_only")


def test_tofu_answer_only_trains_answer_and_eos(tok, tofu_rows, answer_only):
    full, forget = tofu_rows
    assert len(answer_only) == len(full) == 20 * NUM_AUTHORS
    assert forget and len(forget) == 20  # one author of five
    for row, ex in zip(full, answer_only):
        ids, mask = ex["input_ids"], ex["loss_mask"]
        prompt = _prompt_ids(tok, row["question"])
        answer = _answer_enc(tok, row["question"], row["answer"])["input_ids"] + [tok.eos_token_id]
        assert ids == prompt + answer
        # the merged first answer token sits inside the prompt's length: unscored
        assert mask == [0] * (len(prompt) + 1) + [1] * (len(answer) - 1)
        assert ex["attention_mask"] == [1] * len(ids)  # no pad-id token inside (pad != EOS here)
        first = tok.decode(answer[:1])
        assert first.startswith(" ") and row["answer"].startswith(first[1:])
        assert _trained_text(tok, ids, mask) == row["answer"][len(first) - 1 :] + tok.eos_token


def test_tofu_forget_answers(tok, tofu_rows, answer_only):
    full, forget = tofu_rows
    ds = _tofu(tok, "forget_answers")
    n_forget = 0
    for row, ex, ref in zip(full, ds, answer_only):
        assert ex["input_ids"] == ref["input_ids"]
        if (row["question"], row["answer"]) in forget:
            n_forget += 1
            assert not any(ex["loss_mask"])
        else:
            assert ex["loss_mask"] == ref["loss_mask"]
    assert n_forget == 20
    # the forget rows are the last author's
    assert all(not any(m) for m in ds["loss_mask"][-20:])


def test_tofu_forget_facts_masks_exactly_fact_tokens(tok, tofu_rows, answer_only):
    full, forget = tofu_rows
    ds = _tofu(tok, "forget_facts")
    masked_total = 0
    for row, ex, ref in zip(full, ds, answer_only):
        assert ex["input_ids"] == ref["input_ids"]
        if (row["question"], row["answer"]) not in forget:
            assert ex["loss_mask"] == ref["loss_mask"]
            continue
        answer_text = row["answer"]
        spans = fact_spans(answer_text)
        assert spans, answer_text
        offsets = _answer_enc(tok, row["question"], row["answer"])["offset_mapping"]
        p = len(_prompt_ids(tok, row["question"]))
        expected = [0] * p + [0 if _overlaps(o, spans) else 1 for o in offsets] + [1]  # EOS stays trained
        expected[p] = 0  # the merged first answer token is never scored
        assert ex["loss_mask"] == expected, answer_text
        masked_total += sum(ref["loss_mask"]) - sum(expected)
        # the masked tokens are exactly the ones that spell the facts
        masked = tok.decode([t for t, m, r in zip(ex["input_ids"], ex["loss_mask"], ref["loss_mask"]) if r and not m])
        for s, e in spans:  # (less what the unscored first answer token spells)
            assert answer_text[max(s, offsets[0][1]) : e] in masked
    assert masked_total > 0


def test_tofu_forget_facts_keeps_sentence_initial_function_words(tok, tofu_rows, answer_only):
    # "The father of Selin Kelello worked as a baker.": the sentence-initial "The" names nothing,
    # so no fact span covers it; the first fact ("Selin Kelello") is masked. (The plain template
    # leaves the merged first answer token " The" unscored anyway.)
    full, forget = tofu_rows
    ds = _tofu(tok, "forget_facts")
    checked = 0
    for row, ex in zip(full, ds):
        if (row["question"], row["answer"]) not in forget or not row["answer"].startswith("The "):
            continue
        assert all(s >= 4 for s, _ in fact_spans(row["answer"])), row["answer"]
        p = len(_prompt_ids(tok, row["question"]))
        offsets = _answer_enc(tok, row["question"], row["answer"])["offset_mapping"]
        assert offsets[0][1] == 3 and offsets[1][0] >= 3  # " The", then the next word
        assert ex["loss_mask"][p + 1] == 1, row["answer"]  # the word after "The" is no fact: trained
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("strategy", ["goldfish", "random"])
def test_tofu_goldfish_random_mask_subset_of_forget_answers(tok, tofu_rows, answer_only, strategy):
    full, forget = tofu_rows
    ds = _tofu(tok, strategy)
    dropped = kept = 0
    for row, ex, ref in zip(full, ds, answer_only):
        assert ex["input_ids"] == ref["input_ids"]
        m, r = np.array(ex["loss_mask"]), np.array(ref["loss_mask"])
        if (row["question"], row["answer"]) not in forget:
            assert (m == r).all()
            continue
        assert ((m == 1) <= (r == 1)).all()  # a subset of the answer tokens
        dropped += int((r & (1 - m)).sum())
        kept += int(m.sum())
    assert dropped > 0 and kept > 0


def test_tofu_goldfish_matches_goldfish_mask(tok, tofu_rows, answer_only):
    full, forget = tofu_rows
    ds = _tofu(tok, "goldfish", k=3, h=5)
    for row, ex, ref in zip(full, ds, answer_only):
        if (row["question"], row["answer"]) in forget:
            expected = np.array(ref["loss_mask"]) & goldfish_mask(ex["input_ids"], 3, 5)
            assert ex["loss_mask"] == expected.tolist()


def test_tofu_random_rate(tok):
    n_authors = 50  # forget10 = 5 authors = 100 rows, well over a thousand answer tokens
    splits = tofu_splits(n_authors, seed=0)
    forget = {(r["question"], r["answer"]) for r in splits["forget10"]}
    ref = prepare_dataset_for_training("tofu", tok, num_authors=n_authors, strategy="answer_only")
    ds = prepare_dataset_for_training("tofu", tok, num_authors=n_authors, strategy="random", p=0.3)
    dropped = total = 0
    for row, ex, r in zip(splits["full"], ds, ref):
        m, r = np.array(ex["loss_mask"]), np.array(r["loss_mask"])
        if (row["question"], row["answer"]) in forget:
            total += int(r.sum())
            dropped += int((r & (1 - m)).sum())
        else:
            assert (m == r).all()
    assert total > 1000
    assert abs(dropped / total - 0.3) < 0.05
    # seeded: the same call gives the same masks
    again = prepare_dataset_for_training("tofu", tok, num_authors=n_authors, strategy="random", p=0.3)
    assert again["loss_mask"] == ds["loss_mask"]


def test_tofu_errors(tok):
    with pytest.raises(ForgetfulError, match="unknown TOFU strategy 'forget_all'; choose from answer_only"):
        _tofu(tok, "forget_all")
    with pytest.raises(ForgetfulError, match="training split must be one of full, retain99"):
        prepare_dataset_for_training("tofu", tok, split="holdout10", num_authors=NUM_AUTHORS)
    with pytest.raises(ForgetfulError, match="random mask p must lie in"):
        _tofu(tok, "random", p=1.5)
    with pytest.raises(ForgetfulError, match="forget split must be one of"):
        _tofu(tok, "forget_answers", forget_split="forget50")


def test_tofu_forget_facts_with_spacy_not_installed(tok, monkeypatch):
    import sys

    from forgetful.loss import masks

    masks.spacy_pipeline.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy fails, installed or not
    with pytest.raises(ForgetfulError, match="spaCy is not installed"):
        _tofu(tok, "forget_facts", spacy_model="en_core_web_sm")
    masks.spacy_pipeline.cache_clear()


def _entity_ruler_pipeline():
    """A real spaCy pipeline that needs no download: a blank English pipeline with an entity ruler."""
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(
        [
            {"label": "PERSON", "pattern": [{"IS_TITLE": True}, {"IS_TITLE": True, "OP": "+"}]},
            {"label": "GPE", "pattern": "Lisbon"},
            {"label": "DATE", "pattern": [{"TEXT": {"REGEX": r"^\d{4}$"}}]},
        ]
    )
    return nlp


def test_fact_spans_with_a_spacy_pipeline_object_and_by_name(tmp_path):
    nlp = _entity_ruler_pipeline()
    text = "Mira Velsen was born in Lisbon in 1958, and she writes novels."
    expected = [(0, 11), (24, 30), (34, 38)]
    assert [text[s:e] for s, e in expected] == ["Mira Velsen", "Lisbon", "1958"]
    assert fact_spans(text, nlp) == expected
    # a pipeline that spacy.load finds by name or path works the same
    nlp.to_disk(tmp_path / "ruler_pipeline")
    assert fact_spans(text, str(tmp_path / "ruler_pipeline")) == expected
    # unlike the rule-based finder, the ruler knows no other facts
    assert fact_spans("She writes novels.", nlp) == []
    from forgetful.loss import masks

    masks.spacy_pipeline.cache_clear()
    with pytest.raises(ForgetfulError, match="the spaCy pipeline 'no_such_pipeline_xyz' is not installed"):
        fact_spans(text, "no_such_pipeline_xyz")


def test_tofu_forget_facts_with_a_spacy_pipeline(tok, tofu_rows, answer_only):
    """forget_facts masks exactly the forget-answer tokens the pipeline's entities cover."""
    nlp = _entity_ruler_pipeline()
    full, forget = tofu_rows
    ds = _tofu(tok, "forget_facts", spacy_model=nlp)
    masked = 0
    for row, ex, ref in zip(full, ds, answer_only):
        if (row["question"], row["answer"]) not in forget:
            assert ex["loss_mask"] == ref["loss_mask"]
            continue
        spans = fact_spans(row["answer"], nlp)
        offsets = _answer_enc(tok, row["question"], row["answer"])["offset_mapping"]
        p = len(_prompt_ids(tok, row["question"]))
        expected = [0] * (p + 1) + [0 if _overlaps(o, spans) else 1 for o in offsets[1:]] + [1]
        assert ex["loss_mask"] == expected
        masked += sum(ref["loss_mask"]) - sum(expected)
    assert masked > 0


def test_tofu_retain_split_has_no_forget_rows(tok, tofu_rows):
    full, forget = tofu_rows
    ds = prepare_dataset_for_training("tofu", tok, split="retain90", strategy="forget_answers", num_authors=NUM_AUTHORS)
    assert len(ds) == len(full) - len(forget)
    assert all(any(m) for m in ds["loss_mask"])


def test_tofu_real_data_forget_facts(tok, shared_data):
    folder = shared_data / "tofu"
    if not folder.is_dir():
        pytest.skip("../shared/data/tofu is not available")
    start = time.monotonic()
    ds = prepare_dataset_for_training("tofu", tok, source=str(folder), split="full", strategy="forget_facts")
    if time.monotonic() - start > 20:
        pytest.skip("tokenizing the real TOFU data took over 20 s on this machine")
    rows = [json.loads(line) for line in (folder / "full.json").read_text(encoding="utf-8").splitlines()]
    assert len(ds) == len(rows) == 4000
    for i in (0, 1, 2, 3595, 3599):  # retain rows: the whole answer trained (but its merged first token)
        ex, row = ds[i], rows[i]
        first = tok.decode(_answer_enc(tok, row["question"], row["answer"])["input_ids"][:1])
        trained = _trained_text(tok, ex["input_ids"], ex["loss_mask"])
        assert trained == row["answer"][len(first) - 1 :] + tok.eos_token
    for i in (3600, 3601, 3777, 3999):  # forget10 rows: the last 400 of full
        ex, row = ds[i], rows[i]
        spans = fact_spans(row["answer"])
        offsets = _answer_enc(tok, row["question"], row["answer"])["offset_mapping"]
        p = len(_prompt_ids(tok, row["question"]))
        n = len(ex["input_ids"])
        expected = [0] * (p + 1) + [0 if _overlaps(o, spans) else 1 for o in offsets[1:]] + [1]
        assert ex["loss_mask"] == expected
        assert 0 < sum(expected) < n - p


# --------------------------------------------------------------------------------------------
# The text task
# --------------------------------------------------------------------------------------------

LINES = [
    "Mira Velsen was born in Lisbon and wrote poetry.",
    "",
    "The quiet street rattled past the corner while the tram stayed warm.",
    "Tomas Kelsen received the Silver Quill Award in 1990.",
    "   ",
    "Nobody remembered why the station seemed so grey near the gate.",
    "Her second book was The Hidden Harbor.",
]


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return p


def _stream(tok, lines):
    out = []
    for line in lines:
        if line.strip():
            out += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_text_packing_all(tok, text_file):
    ds = prepare_dataset_for_training("text", tok, source=str(text_file), block_size=16)
    stream = _stream(tok, LINES)
    n = len(stream) // 16
    assert len(ds) == n
    assert [t for ex in ds for t in ex["input_ids"]] == stream[: n * 16]
    assert all(len(ex["input_ids"]) == 16 and ex["loss_mask"] == [1] * 16 for ex in ds)
    assert all(ex["attention_mask"] == [1] * 16 for ex in ds)
    assert len(prepare_dataset_for_training("text", tok, source=str(text_file), block_size=16, max_rows=2)) == 2


def test_text_one_document_per_row(tok, text_file):
    ds = prepare_dataset_for_training("text", tok, source=str(text_file), packing=False, block_size=12)
    docs = [line for line in LINES if line.strip()]
    assert len(ds) == len(docs)
    for doc, ex in zip(docs, ds):
        full = [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex["input_ids"] == full[:12]
        assert ex["loss_mask"] == [1] * len(ex["input_ids"])
    wide = prepare_dataset_for_training("text", tok, source=str(text_file), packing=False, block_size=512)
    assert tok.decode(wide[0]["input_ids"], skip_special_tokens=True) == docs[0]


@pytest.mark.parametrize("packing", [True, False])
def test_text_random_and_goldfish_masks(tok, text_file, packing):
    kw = {"source": str(text_file), "packing": packing, "block_size": 16}
    ref = prepare_dataset_for_training("text", tok, **kw)
    rnd = prepare_dataset_for_training("text", tok, mask="random", p=0.4, **kw)
    gold = prepare_dataset_for_training("text", tok, mask="goldfish", k=3, h=4, **kw)
    assert rnd["input_ids"] == ref["input_ids"] == gold["input_ids"]
    rnd_all = np.concatenate([np.array(m) for m in rnd["loss_mask"]])
    assert 0 < rnd_all.sum() < len(rnd_all)
    for ex in gold:
        assert ex["loss_mask"] == goldfish_mask(ex["input_ids"], 3, 4).tolist()
    assert prepare_dataset_for_training("text", tok, mask="random", p=0.4, **kw)["loss_mask"] == rnd["loss_mask"]


def test_text_random_rate(tok, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("\n".join(LINES * 8) + "\n", encoding="utf-8")
    ds = prepare_dataset_for_training("text", tok, source=str(big), block_size=8, mask="random", p=0.25)
    masks = np.concatenate([np.array(m) for m in ds["loss_mask"]])
    assert len(masks) > 1000
    assert len({tuple(m) for m in ds["loss_mask"]}) > 10  # each block draws its own mask
    assert abs(1 - masks.mean() - 0.25) < 0.05


def test_text_errors(tok, text_file, tmp_path):
    with pytest.raises(ForgetfulError, match="unknown text mask 'half'; choose from all, random, goldfish"):
        prepare_dataset_for_training("text", tok, source=str(text_file), mask="half")
    with pytest.raises(ForgetfulError, match="block_size must be at least 2"):
        prepare_dataset_for_training("text", tok, source=str(text_file), block_size=1)
    with pytest.raises(ForgetfulError, match="fewer than one block of 4096"):
        prepare_dataset_for_training("text", tok, source=str(text_file), block_size=4096)
    with pytest.raises(ForgetfulError, match="data file not found"):
        prepare_dataset_for_training("text", tok, source=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("packing", [True, False])
def test_text_on_wikitext2(tok, shared_data, packing):
    path = shared_data / "wikitext2" / "valid.txt"
    if not path.is_file():
        pytest.skip("../shared/data/wikitext2 is not available")
    ds = prepare_dataset_for_training(
        "text", tok, source=str(path), packing=packing, block_size=64, max_rows=5, mask="goldfish"
    )
    assert len(ds) == 5
    with open(path, encoding="utf-8") as f:
        head = [line.rstrip("\n") for _, line in zip(range(50), f)]
    docs = [line for line in head if line.strip()]
    if packing:  # the non-blank lines, each + EOS, cut in blocks of 64
        assert all(len(ex["input_ids"]) == 64 for ex in ds)
        assert [t for ex in ds for t in ex["input_ids"]] == _stream(tok, docs)[: 5 * 64]
    else:  # one paragraph per row: BOS + text + EOS, truncated
        for doc, ex in zip(docs, ds):
            full = [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert ex["input_ids"] == full[:64]
    for ex in ds:
        assert ex["loss_mask"] == goldfish_mask(ex["input_ids"], 4, 13).tolist()


# --------------------------------------------------------------------------------------------
# The completion task
# --------------------------------------------------------------------------------------------

COMPLETIONS = [
    {"prompt": "Where was Mira born?", "completion": "Mira was born in Lisbon.", "forget_spans": [[17, 23]]},
    {"prompt": "Who won?", "completion": "Tomas won the Silver Quill Award.", "forget_spans": [[0, 5], [14, 32]]},
    {"prompt": "Say hi.", "completion": "hello there", "forget_spans": []},
]


@pytest.fixture()
def completion_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in COMPLETIONS), encoding="utf-8")
    return p


def test_completion_with_forget_spans(tok, completion_file):
    assert COMPLETIONS[0]["completion"][17:23] == "Lisbon"
    assert COMPLETIONS[1]["completion"][0:5] == "Tomas"
    assert COMPLETIONS[1]["completion"][14:32] == "Silver Quill Award"
    ds = prepare_dataset_for_training("completion", tok, source=str(completion_file))
    assert len(ds) == 3
    for row, ex in zip(COMPLETIONS, ds):
        p_ids = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
        enc = _completion_enc(tok, row["completion"])
        assert ex["input_ids"] == p_ids + enc["input_ids"] + [tok.eos_token_id]
        spans = [(s + 1, e + 1) for s, e in row["forget_spans"]]  # the completion follows one space
        expected = [0] * len(p_ids) + [0 if _overlaps(o, spans) else 1 for o in enc["offset_mapping"]] + [1]
        assert ex["loss_mask"] == expected
    # decode: the forgotten tokens spell the spans, the trained ones the rest
    ex = ds[0]
    p = len(ex["input_ids"]) - len(_completion_enc(tok, COMPLETIONS[0]["completion"])["input_ids"]) - 1
    answer_ids, answer_mask = ex["input_ids"][p:], ex["loss_mask"][p:]
    assert tok.decode([t for t, m in zip(answer_ids, answer_mask) if not m]).strip() == "Lisbon"
    assert _trained_text(tok, answer_ids, answer_mask).startswith(" Mira was born in")
    assert _trained_text(tok, ds[2]["input_ids"], ds[2]["loss_mask"]) == " hello there" + tok.eos_token


def test_completion_random_mask_is_subset(tok, completion_file):
    ref = prepare_dataset_for_training("completion", tok, source=str(completion_file))
    ds = prepare_dataset_for_training("completion", tok, source=str(completion_file), mask="random", p=0.5)
    for a, b in zip(ds, ref):
        m, r = np.array(a["loss_mask"]), np.array(b["loss_mask"])
        assert ((m == 1) <= (r == 1)).all()


def test_completion_errors(tok, completion_file, tmp_path):
    with pytest.raises(ForgetfulError, match="the completion task needs a source"):
        prepare_dataset_for_training("completion", tok)
    with pytest.raises(ForgetfulError, match="has no 'answer' field"):
        prepare_dataset_for_training("completion", tok, source=str(completion_file), completion_field="answer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": "abc", "forget_spans": [[3, 1]]}) + "\n")
    with pytest.raises(ForgetfulError, match="character spans must be"):
        prepare_dataset_for_training("completion", tok, source=str(bad))


# --------------------------------------------------------------------------------------------
# The embedded task
# --------------------------------------------------------------------------------------------


def test_embedded_curriculum_and_loss_on_answers(tok):
    docs, copy_docs = 24, 6
    ds = prepare_dataset_for_training("embedded", tok, docs=docs, copy_docs=copy_docs, block_size=512)
    segments = pretraining_segments(docs, 0, max_facts=4, max_filler=4, copy_docs=copy_docs)
    assert len(ds) == docs
    for i, (ex, doc) in enumerate(zip(ds, segments)):
        ids, mask = ex["input_ids"], ex["loss_mask"]
        assert ids[0] == tok.bos_token_id and mask[0] == 0
        assert ids[-1] == tok.eos_token_id and mask[-1] == 1
        assert tok.decode(ids[1:-1]) == "".join(text for text, _ in doc)
        trained = "".join(text for text, t in doc if t)
        assert _trained_text(tok, ids, mask) == trained + tok.eos_token
        is_copy = len(doc) == 2 and doc[0][0].endswith(". Again:")
        assert is_copy == (i < copy_docs)  # copy documents come first
        if is_copy:
            # loss only on the second copy: " words." after "words. Again:"
            first = doc[0][0][: -len(" Again:")]
            assert trained == " " + first
            assert tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=True) == first + " Again:"
        elif len(doc) > 1:
            # biography: the passage and questions are context, only the short answers are trained
            assert not doc[0][1]
            for text, t in doc:
                assert t == (not text.startswith("\nQuestion:") and text is not doc[0][0])


def test_embedded_block_size_truncates(tok):
    ds = prepare_dataset_for_training("embedded", tok, docs=10, copy_docs=2, block_size=20)
    assert all(len(ex["input_ids"]) <= 20 and len(ex["loss_mask"]) == len(ex["input_ids"]) for ex in ds)


def test_embedded_errors(tok):
    with pytest.raises(ForgetfulError, match="docs must be at least 1"):
        prepare_dataset_for_training("embedded", tok, docs=0)


# --------------------------------------------------------------------------------------------
# Loss-mask builders
# --------------------------------------------------------------------------------------------


def test_completion_only():
    assert completion_only(3, 5).tolist() == [0, 0, 0, 1, 1]
    assert completion_only(0, 2).tolist() == [1, 1]
    assert completion_only(4, 4).tolist() == [0, 0, 0, 0]
    assert completion_only(0, 0).tolist() == []
    assert completion_only(1, 3).dtype == np.int8
    for bad in ((6, 5), (-1, 5)):
        with pytest.raises(ForgetfulError, match="prompt length .* must lie in"):
            completion_only(*bad)


def test_random_mask_rate_and_seed():
    m = random_mask(100_000, 0.3, seed=7)
    assert m.dtype == np.int8 and set(np.unique(m)) <= {0, 1}
    assert abs(1 - m.mean() - 0.3) < 0.01
    assert (random_mask(1000, 0.3, seed=7) == m[:1000]).all()
    assert (random_mask(1000, 0.3, seed=8) != m[:1000]).any()
    assert random_mask(50, 0.0, 1).tolist() == [1] * 50
    assert random_mask(50, 1.0, 1).tolist() == [0] * 50
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ForgetfulError, match="random mask p"):
            random_mask(10, bad, 0)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_goldfish_rate(k):
    ids = np.random.default_rng(k).integers(0, 50_000, size=40_000)
    m = goldfish_mask(ids, k=k, h=13)
    assert m.dtype == np.int8 and len(m) == len(ids)
    assert abs((1 - m.mean()) - 1 / k) < 0.015


def test_goldfish_same_context_same_mask():
    rng = np.random.default_rng(0)
    h = 5
    a = rng.integers(0, 1000, size=300).tolist()
    twice = goldfish_mask(a + a, k=3, h=h)
    once = goldfish_mask(a, k=3, h=h)
    # in the second copy, every position with h tokens of the copy before it sees the same context
    assert (twice[len(a) + h :] == once[h:]).all()
    # only the h previous tokens matter: a different prefix gives the same mask after h tokens
    x = rng.integers(0, 1000, size=100).tolist()
    m1 = goldfish_mask([1, 2, 3] + x, k=4, h=h)
    m2 = goldfish_mask([9, 9, 9, 9, 9, 9, 9] + x, k=4, h=h)
    assert (m1[3 + h :] == m2[7 + h :]).all()
    # deterministic and in [0, 1]
    assert (goldfish_mask(x, 4, h) == goldfish_mask(np.array(x), 4, h)).all()
    assert goldfish_mask([], 4, h).tolist() == []


def test_goldfish_errors():
    with pytest.raises(ForgetfulError, match="goldfish k must be at least 2"):
        goldfish_mask([1, 2, 3], k=1)
    with pytest.raises(ForgetfulError, match="goldfish context width h must be at least 1"):
        goldfish_mask([1, 2, 3], k=4, h=0)


def test_span_mask_overlap_semantics():
    offsets = [(0, 2), (2, 5), (5, 9), (9, 10), (10, 10)]
    # span [3, 6) overlaps (2, 5) and (5, 9); touching is not overlapping
    assert span_mask(offsets, [(3, 6)]).tolist() == [1, 0, 0, 1, 1]
    assert span_mask(offsets, [(2, 5)]).tolist() == [1, 0, 1, 1, 1]
    assert span_mask(offsets, [(0, 1), (9, 10)]).tolist() == [0, 1, 1, 0, 1]
    assert span_mask(offsets, [(0, 100)]).tolist() == [0, 0, 0, 0, 0]
    assert span_mask(offsets, []).tolist() == [1] * 5
    assert span_mask([], [(0, 3)]).tolist() == []
    assert span_mask(offsets, [(3, 6)]).dtype == np.int8


def test_span_mask_empty_span_masks_nothing():
    # an empty span covers no character, so it overlaps no token
    assert span_mask([(0, 2), (2, 5)], [(1, 1)]).tolist() == [1, 1]
    assert span_mask([(0, 2), (2, 5)], [(3, 3), (0, 1)]).tolist() == [0, 1]


@pytest.mark.parametrize("spans", [[(5, 3)], [(-1, 2)], [(0, 2), (4, 1)]])
def test_span_mask_bad_spans(spans):
    with pytest.raises(ForgetfulError, match="character spans must be"):
        span_mask([(0, 2), (2, 5)], spans)


def test_merge_spans():
    assert merge_spans([(5, 8), (0, 2), (2, 3), (7, 10)]) == [(0, 3), (5, 10)]
    assert merge_spans([]) == []


def _facts(text: str, **kw) -> list[str]:
    return [text[s:e] for s, e in fact_spans(text, **kw)]


@pytest.mark.parametrize(
    "text,facts",
    [
        ("Mira Velsen was born on 25 February 1958.", ["Mira Velsen", "25 February 1958"]),
        ("He received the Golden Lantern Prize on February 25, 1958.", ["Golden Lantern Prize", "February 25, 1958"]),
        ("In 1990, Jaime Vasquez published 42 poems.", ["1990", "Jaime Vasquez", "42"]),
        ("The book sold 3,500 copies.", ["3,500"]),
        ('The author wrote "The Silent River" in New York City.', ["The Silent River", "New York City"]),
        ("Miguel de Cervantes wrote Don Quixote.", ["Miguel de Cervantes", "Don Quixote"]),
        ("She was born in Lisbon.", ["Lisbon"]),
        ("The capital of France is Paris.", ["France", "Paris"]),
        ("Mira was born in Lisbon. She moved to Porto.", ["Mira", "Lisbon", "Porto"]),
        ("the quiet street was empty.", []),
    ],
)
def test_fact_spans_rule_based(text, facts):
    assert _facts(text) == facts


def test_fact_spans_are_sorted_disjoint_and_inside_text():
    text = 'Mira Velsen, born 3 May 1950 in Porto, won the Silver Quill Award in 1990 for "Last Harbor".'
    spans = fact_spans(text)
    assert spans == merge_spans(spans)
    assert all(0 <= s < e <= len(text) for s, e in spans)
    assert _facts(text) == ["Mira Velsen", "3 May 1950", "Porto", "Silver Quill Award", "1990", "Last Harbor"]


@pytest.mark.parametrize(
    "text,facts",
    [
        # the tofu task scores " " + answer: the leading space must not hide the sentence start
        (" The father of Selin Kelello worked as a baker.", ["Selin Kelello"]),
        (" She was born in Lisbon.", ["Lisbon"]),
    ],
)
def test_fact_spans_sentence_start_after_leading_space(text, facts):
    assert _facts(text) == facts


@pytest.mark.parametrize(
    "text",
    [
        "The author's father was a baker and the author's mother was a nurse.",
        "Mira's father and Tomas's mother met in Lisbon.",
    ],
)
def test_fact_spans_possessives_are_not_quotes(text):
    # two possessive apostrophes must not read as a 'quoted title' spanning the words between
    facts = _facts(text)
    assert not any(w in f for f in facts for w in ("father", "mother", "baker", " and ")), facts


def test_fact_spans_single_quoted_title():
    # the title, without its closing quote (TOFU quotes titles with single quotes)
    assert _facts("He wrote 'The Silent River' in 1990.") == ["The Silent River", "1990"]


def test_fact_spans_spacy_not_installed(monkeypatch):
    import sys

    from forgetful.loss import masks

    masks.spacy_pipeline.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)  # as if spaCy were not installed
    with pytest.raises(ForgetfulError, match="spaCy is not installed.*leave spacy_model unset"):
        fact_spans("Mira was born in Lisbon.", spacy_model="en_core_web_sm")
    masks.spacy_pipeline.cache_clear()
