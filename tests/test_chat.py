"""Conversations through the tokenizer's own chat template (data/chat.py): pieces and labels for real templates,
the prefix rule, and scores against brute-force autograd on a tiny Llama whose tokenizer carries the template."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from chat_templates import LLAMA3, OLMO2_TULU, QWEN25, REWRITES_EARLIER, SPECIAL_TOKENS
from helpers import assert_close_to_largest, assert_one_line_error, fit_args, make_tokenizer, tiny_config, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from if_query import run_query
from if_query.data.chat import render
from if_query.data.records import parse_records
from if_query.data.tokenization import IGNORE_INDEX, ExampleTokenizer
from if_query.errors import InputError

TWO_TURNS = (("user", "who is Alice ?"), ("assistant", "Alice is a doctor ."),
             ("user", "where ?"), ("assistant", "Alice lives in Paris ."))


def chat_tokenizer(template: str | None):
    tokenizer = make_tokenizer(bos=True)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("template", [OLMO2_TULU, LLAMA3, QWEN25], ids=["olmo2-tulu", "llama3", "qwen2.5"])
def test_real_templates_cut_into_pieces_that_join_to_the_rendering(template):
    tokenizer = chat_tokenizer(template)
    whole = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in TWO_TURNS], tokenize=False)
    every = render(tokenizer, TWO_TURNS, True, "t")
    assert "".join(p.text for p in every.pieces) == whole
    assert [p.text for p in every.pieces if p.labelled and not p.closing] == [TWO_TURNS[1][1], TWO_TURNS[3][1]]
    assert all(p.text for p in every.pieces if p.closing)  # each turn's closing (EOS, <|eot_id|>, <|im_end|>)
    last = render(tokenizer, TWO_TURNS, False, "t")
    assert [p.text for p in last.pieces if p.labelled and not p.closing] == [TWO_TURNS[3][1]]
    assert "".join(p.text for p in last.pieces) == whole
    assert last.completion == TWO_TURNS[3][1] and whole.startswith(last.prompt + last.completion)
    assert last.prompt == tokenizer.apply_chat_template(  # the conversation before the last turn, as the CSVs show it
        [{"role": r, "content": c} for r, c in TWO_TURNS[:3]], tokenize=False, add_generation_prompt=True)


def test_a_template_that_rewrites_earlier_turns_is_refused_where_every_turn_is_labelled():
    tokenizer = chat_tokenizer(REWRITES_EARLIER)
    [record] = parse_records([{"pair_id": "r1", "messages": [
        {"role": "user", "content": "who ?"}, {"role": "assistant", "content": "<think> hm </think> Alice"},
        {"role": "user", "content": "where ?"}, {"role": "assistant", "content": "Paris"}]}], "train.json")
    example_tokenizer = ExampleTokenizer(tokenizer, 128)
    with pytest.raises(InputError, match=r"train.json: pair_id 'r1': .*rewrites earlier turns"):
        example_tokenizer(record, "train.json")
    example_tokenizer(record, "query.json", every_turn=False)  # its last turn alone follows the rule


def test_no_eos_in_loss_leaves_each_closing_out_and_the_position_cap_cuts_from_the_left():
    tokenizer = chat_tokenizer(OLMO2_TULU)
    [record] = parse_records([{"pair_id": "r1", "messages": [{"role": r, "content": c} for r, c in TWO_TURNS]}], "x")

    def scored(example_tokenizer, every_turn):
        tokens = example_tokenizer(record, "x", every_turn=every_turn)
        labelled = zip(tokens.input_ids, tokens.labels, strict=True)
        return tokens, tokenizer.decode([i for i, label in labelled if label >= 0])

    with_eos, without = ExampleTokenizer(tokenizer, 512), ExampleTokenizer(tokenizer, 512, eos_in_loss=False)
    assert scored(with_eos, True)[1] == "Alice is a doctor .<|endoftext|>Alice lives in Paris .<|endoftext|>"
    assert scored(with_eos, False)[1] == "Alice lives in Paris .<|endoftext|>"
    assert scored(without, True)[1] == "Alice is a doctor .Alice lives in Paris ."
    assert scored(without, False)[1] == "Alice lives in Paris ."
    whole, _ = scored(with_eos, False)
    assert whole.input_ids[0] == tokenizer.bos_token_id and whole.input_ids.count(tokenizer.bos_token_id) == 1
    # the model's positions cap --max-length as for prompt/completion records: cut from the left, the last turn kept
    capped = ExampleTokenizer(tokenizer, 512, position_limit=12)
    tokens, text = scored(capped, False)
    assert tokens.input_ids == whole.input_ids[-12:] and text == "Alice lives in Paris .<|endoftext|>"
    assert capped.cut == ["x: pair_id 'r1'"]
    with pytest.raises(InputError, match=r"x: pair_id 'r1': the last assistant turn is 6 tokens"):
        ExampleTokenizer(tokenizer, 512, position_limit=5)(record, "x", every_turn=False)


def piece_tokens(tokenizer, pieces):
    """Token ids and labels from (text, labelled) pieces, each tokenized alone: the module docstring's rule,
    written out for the OLMo-2/Tulu template by hand."""
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    return ids, labels


def tulu_pieces(turns, every_turn):
    """The OLMo-2/Tulu rendering of (user, assistant) turns as (text, labelled) pieces."""
    pieces, last = [("<s>", False)], len(turns) - 1
    for index, (user, assistant) in enumerate(turns):
        scored = every_turn or index == last
        pieces += [(("\n" if index else "") + f"<|user|>\n{user}\n<|assistant|>\n", False),
                   (assistant, scored), ("<|endoftext|>", scored)]
    return pieces


def test_conversations_score_as_brute_force_autograd_and_as_prompt_completion_records(tmp_path, cli):
    model_dir = tmp_path / "model"
    tokenizer = chat_tokenizer(OLMO2_TULU)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).save_pretrained(model_dir)
    fitting = tmp_path / "fitting.jsonl"
    fitting.write_text("\n".join(json.dumps({"pair_id": str(i), "messages": [
        {"role": "user", "content": f"who is {name} ?"}, {"role": "assistant", "content": f"{name} is a {job} ."}]})
        for i, (name, job) in enumerate([("Alice", "doctor"), ("Bob", "baker"), ("Carol", "pilot")])))
    cli(*fit_args(model_dir, fitting, tmp_path / "factors", "--strategy", "identity", "--chat-template"))

    single = [("who is Bob ?", "Bob is a baker ."), ("where does Carol live ?", "Carol lives in Rome .")]
    multi = [("who is Alice ?", "Alice is a doctor ."), ("where ?", "Alice lives in Paris .")]
    query_multi = [("who is Dave ?", "Dave is a pilot ."), ("where ?", "Dave lives in Oslo .")]

    def conversation(turns):
        return [{"role": role, "content": text} for user, assistant in turns
                for role, text in (("user", user), ("assistant", assistant))]

    as_messages = {"train": [{"pair_id": "t1", "messages": conversation(single[:1])},
                             {"pair_id": "t2", "messages": conversation(single[1:])},
                             {"pair_id": "t3", "messages": conversation(multi)}],
                   "query": [{"pair_id": "q1", "messages": conversation(single[:1])},
                             {"pair_id": "q2", "messages": conversation(query_multi)}]}
    as_records = {"train": [{"pair_id": "t1", "prompt": single[0][0], "completion": single[0][1]},
                            {"pair_id": "t2", "prompt": single[1][0], "completion": single[1][1]},
                            as_messages["train"][2]],
                  "query": [{"pair_id": "q1", "prompt": single[0][0], "completion": single[0][1]},
                            as_messages["query"][1]]}
    frames = []
    for name, files, extra in (("messages", as_messages, ("--per-token-scores",)),
                               ("records", as_records, ("--chat-template",))):
        paths = {side: write_json(tmp_path / f"{name}-{side}.json", records) for side, records in files.items()}
        cli("run-query", "--model", model_dir, "--factors-dir", tmp_path / "factors", "--train-json", paths["train"],
            "--query-json", paths["query"], "--output-dir", tmp_path / name, "--quiet", *extra)
        frames.append(pd.read_csv(tmp_path / name / "influences.csv").sort_values(["query_id", "train_id"]))
    corpus = tmp_path / "corpus.jsonl"  # the same train conversations as --train-dataset documents
    corpus.write_text("\n".join(json.dumps({"id": r["pair_id"], "messages": r["messages"]})
                                 for r in as_messages["train"]))
    cli("run-query", "--model", model_dir, "--factors-dir", tmp_path / "factors", "--train-dataset", corpus,
        "--query-json", tmp_path / "messages-query.json", "--output-dir", tmp_path / "corpus", "--quiet")
    frames.append(pd.read_csv(tmp_path / "corpus" / "influences.csv").sort_values(["query_id", "train_id"]))
    [in_memory] = run_query(model=str(model_dir), factors_dir=str(tmp_path / "factors"),  # from Python, as dicts
                            queries=as_messages["query"], train=as_messages["train"], quiet=True)
    frames.append(in_memory.results.influences.sort_values(["query_id", "train_id"]))
    [mixed] = run_query(model=str(model_dir), factors_dir=str(tmp_path / "factors"), chat_template=True,
                        queries=pd.DataFrame(as_records["query"]), train=pd.DataFrame(as_records["train"]),
                        quiet=True)  # both kinds in one DataFrame: each row lacks the other kind's columns (NaN)
    frames.append(mixed.results.influences.sort_values(["query_id", "train_id"]))
    for frame in frames[1:]:  # the same tokens (the corpus's other batches may round otherwise)
        assert list(frame["train_id"]) == list(frames[0]["train_id"])
        assert_close_to_largest(frame["influence_score"], frames[0]["influence_score"], 1e-5)
    run = json.loads((tmp_path / "messages" / "run.json").read_text())
    assert run["chat_template"] is not None
    shown = pd.read_csv(tmp_path / "messages" / "query.csv").set_index("query_id")
    assert shown.loc["q2", "completion"] == "Dave lives in Oslo ." and shown.loc["q2", "prompt"].endswith(
        "where ?\n<|assistant|>\n")

    # Brute force: float64 gradients of every MLP weight (the tracked set), tokens built by hand.
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    params = [p for n, p in reference.named_parameters() if ".mlp." in n]
    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # per-token scores are over the templated tokens, which train.csv shows
    train_csv = pd.read_csv(tmp_path / "messages" / "train.csv").set_index("train_id")
    ids, _ = piece_tokens(hf_tokenizer, tulu_pieces(multi, True))
    assert json.loads(train_csv.loc["t3", "tokens"]) == [hf_tokenizer.decode([i]) for i in ids]
    sums = [sum(json.loads(scores)) for scores in frames[0]["per_token_scores"]]
    assert_close_to_largest(sums, frames[0]["influence_score"], 1e-4)

    def gradient(turns, every_turn):
        ids, labels = piece_tokens(hf_tokenizer, tulu_pieces(turns, every_turn))
        logits = reference(torch.tensor([ids])).logits[0]
        loss = F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum")
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    train = torch.stack([gradient(single[:1], True), gradient(single[1:], True), gradient(multi, True)])
    queries = torch.stack([gradient(single[:1], False), gradient(query_multi, False)])
    table = frames[0].pivot(index="query_id", columns="train_id", values="influence_score")
    assert_close_to_largest(table.loc[["q1", "q2"], ["t1", "t2", "t3"]].to_numpy(), queries @ train.T)
    # the multi-turn train record labels both assistant turns: its gradient is not its last turn's alone
    assert not torch.allclose(train[2], gradient(multi, False), rtol=1e-3)


def test_a_tokenizer_without_a_chat_template_is_refused_in_one_line(tmp_path, cli):
    model_dir = tmp_path / "model"
    tokenizer = chat_tokenizer(None)
    tokenizer.save_pretrained(model_dir)
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).save_pretrained(model_dir)
    data = write_json(tmp_path / "fit.json", [{"pair_id": "a", "prompt": "who ?", "completion": " Alice"}])
    result = cli(*fit_args(model_dir, data, tmp_path / "factors", "--chat-template"), expect=2)
    assert_one_line_error(result, 2, "error: --chat-template needs the tokenizer's chat template")
    assert result.stderr.count("--chat-template") == 2  # the flag named once, and what to do
    assert not (tmp_path / "factors" / "factors_hessian").exists()
    # a conversation without --chat-template: the record is named, not a flag that was not given
    conversation = write_json(tmp_path / "conv.json", [{"pair_id": "c1", "messages": [
        {"role": "user", "content": "who ?"}, {"role": "assistant", "content": "Alice"}]}])
    result = cli(*fit_args(model_dir, conversation, tmp_path / "factors"), expect=2)
    assert_one_line_error(result, 2, "conv.json: pair_id 'c1': a conversation ('messages') needs the tokenizer's "
                                     "chat template")
    assert "--chat-template" not in result.stderr
