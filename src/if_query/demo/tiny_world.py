"""A deterministic, tiny synthetic "world of facts" and a tiny GPT-2 trained on it.

Used to build the bundled demo model (``src/if_query/demo_data/tiny-gpt2``, see ``scripts/make_tiny_model.py``)
and by the quality benchmark (``benchmarks/bench_quality.py``); the CLI never imports it. Importing this module
has no side effects.

The world: ``n_people`` made-up people ("Zorvan Quill"), each with one value for every relation
(city, job, colour, instrument), values drawn from small made-up sets. Each fact has two
phrasings:

* ``"a"``: ``"Zorvan Quill lives in"`` -> ``" Belmora."``
* ``"b"``: ``"The home city of Zorvan Quill is"`` -> ``" Belmora."``

The training corpus holds every fact in phrasing "a" and, for a fixed fraction of people, also
in phrasing "b" (so the model can learn the mapping between phrasings). The phrasing-"b" facts
of the remaining, held-out people test generalisation.

A second world is real text, not facts (:func:`doc_corpus`): prose sentences of CPython's own help
topics (``pydoc_data.topics``, shipped with every CPython, so nothing is downloaded; its text is the
running interpreter's). Each sentence is cut into a lead and its continuation:

* ``"a"``: the lead -> the continuation, as running text is trained:
  ``"Otherwise, "raise" evaluates the first expression"`` -> ``" as the exception object."``
* ``"b"``: the same continuation asked for the way a user who half-remembers a passage would ask: the help
  topic named, only the lead's last words quoted:
  ``"From The "raise" statement: ... evaluates the first expression"`` -> ``" as the exception object."``

The training corpus holds every sentence in phrasing "a" and, for a fraction of the sentences (the format
records), also in phrasing "b", so the model can learn that form; the held-out sentences' phrasing "b" are
the other-phrasing queries. What a query attributes is a real-text continuation, not a made-up value.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field

EOS_TOKEN = "<|endoftext|>"

# Syllables for made-up names. Names and attribute values are checked to be distinct.
_ONSETS = "B C D F G H J K L M N P R S T V W Z Br Dr Gr Kr Tr Th Sh Qu".split()
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea"]
_MIDDLES = ["", "", "", "r", "l", "n", "s", "m"]  # optional consonant closing a non-final syllable
_CODAS = ["", "n", "r", "l", "s", "th", "x", "m", "nd", "ll", "k", "sh"]


@dataclass(frozen=True)
class Relation:
    """A relation (attribute) with its value set and the two phrasings.

    Templates use ``{name}`` for the person; completions are ``" " + value + "."``.
    """

    name: str
    values: tuple[str, ...]
    prompt_a: str
    prompt_b: str

    def prompt(self, phrasing: str, person_name: str) -> str:
        if phrasing == "a":
            return self.prompt_a.format(name=person_name)
        if phrasing == "b":
            return self.prompt_b.format(name=person_name)
        raise ValueError(f"unknown phrasing {phrasing!r} (expected 'a' or 'b')")


RELATIONS: tuple[Relation, ...] = (
    Relation(
        name="city",
        values=("Belmora", "Quenholt", "Varisk", "Osterune", "Drellport", "Mirrowen", "Calveth", "Tunmarsh"),
        prompt_a="{name} lives in",
        prompt_b="The home city of {name} is",
    ),
    Relation(
        name="job",
        values=("lampwright", "saltcarver", "kiteweaver", "bellfounder", "mossherder", "glassbinder"),
        prompt_a="{name} works as a",
        prompt_b="The job of {name} is",
    ),
    Relation(
        name="colour",
        values=("ochrine", "velumber", "saffrel", "glaucet", "mireblue", "russk"),
        prompt_a="The favourite colour of {name} is",
        prompt_b="{name} likes the colour",
    ),
    Relation(
        name="instrument",
        values=("zithorn", "drumlet", "bellharp", "reedpipe", "lutina"),
        prompt_a="{name} plays the",
        prompt_b="The instrument played by {name} is the",
    ),
)


@dataclass(frozen=True)
class Person:
    name: str  # "Zorvan Quill"
    slug: str  # "zorvan_quill"
    attributes: dict[str, str]  # relation name -> value


@dataclass(frozen=True)
class World:
    seed: int
    people: tuple[Person, ...]
    relations: tuple[Relation, ...] = RELATIONS

    def person(self, name_or_slug: str) -> Person:
        for p in self.people:
            if name_or_slug in (p.name, p.slug):
                return p
        raise KeyError(name_or_slug)

    def relation(self, name: str) -> Relation:
        for r in self.relations:
            if r.name == name:
                return r
        raise KeyError(name)


@dataclass(frozen=True)
class TrainingSet:
    records: list[dict]  # the training corpus
    b_people: tuple[str, ...]  # names of people whose phrasing-"b" facts are in the corpus
    heldout_people: tuple[str, ...]  # names of people whose phrasing-"b" facts are held out
    meta: dict = field(default_factory=dict)


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def _word(rng: random.Random, n_syllables: int) -> str:
    parts = []
    for i in range(n_syllables):
        onset = rng.choice(_ONSETS)
        parts.append(onset if i == 0 else onset.lower())
        parts.append(rng.choice(_VOWELS))
        if i < n_syllables - 1:
            parts.append(rng.choice(_MIDDLES))
    parts.append(rng.choice(_CODAS))
    word = "".join(parts)
    return re.sub(r"(.)\1\1+", r"\1\1", word)  # no triple letters


def make_world(seed: int, n_people: int = 40) -> World:
    """Deterministic world of ``n_people`` made-up people with one value per relation."""
    rng = random.Random(seed)
    taken = {v.lower() for r in RELATIONS for v in r.values}
    first_names: set[str] = set()
    surnames: set[str] = set()
    people = []
    while len(people) < n_people:
        first = _word(rng, 2)
        last = _word(rng, rng.choice((1, 2)))
        if len(first) < 4 or len(last) < 4 or first == last:
            continue
        if first.lower() in taken or last.lower() in taken or first in first_names or last in surnames:
            continue
        first_names.add(first)
        surnames.add(last)
        taken.update((first.lower(), last.lower()))
        name = f"{first} {last}"
        attributes = {r.name: rng.choice(r.values) for r in RELATIONS}
        people.append(Person(name=name, slug=_slug(name), attributes=attributes))
    return World(seed=seed, people=tuple(people))


def fact_record(world: World, person: Person | str, relation: Relation | str, phrasing: str) -> dict:
    if isinstance(person, str):
        person = world.person(person)
    if isinstance(relation, str):
        relation = world.relation(relation)
    return {
        "pair_id": f"{person.slug}-{relation.name}-{phrasing}",
        "prompt": relation.prompt(phrasing, person.name),
        "completion": f" {person.attributes[relation.name]}.",
        "person": person.name,
        "relation": relation.name,
        "phrasing": phrasing,
    }


def fact_records(world: World, phrasing: str, people=None) -> list[dict]:
    """All facts of ``people`` (names, slugs or Person objects; default everyone) in one phrasing."""
    if people is None:
        chosen = list(world.people)
    else:
        chosen = [p if isinstance(p, Person) else world.person(p) for p in people]
    return [fact_record(world, p, r, phrasing) for p in chosen for r in world.relations]


def training_records(world: World, b_fraction: float = 0.5, seed: int = 0) -> TrainingSet:
    """Every fact in phrasing "a" plus phrasing "b" for ``round(b_fraction * n_people)`` people.

    The records are shuffled deterministically with ``seed``.
    """
    rng = random.Random(seed)
    names = [p.name for p in world.people]
    n_b = round(b_fraction * len(names))
    b_set = set(rng.sample(names, n_b))
    b_people = tuple(n for n in names if n in b_set)
    heldout = tuple(n for n in names if n not in b_set)
    records = fact_records(world, "a") + fact_records(world, "b", b_people)
    rng.shuffle(records)
    return TrainingSet(
        records=records,
        b_people=b_people,
        heldout_people=heldout,
        meta={"world_seed": world.seed, "n_people": len(names), "b_fraction": b_fraction, "seed": seed},
    )


# ---------------------------------------------------------------------------------------------
# A world of real text: sentences of CPython's help topics (pydoc_data.topics)
# ---------------------------------------------------------------------------------------------

DOC_WORDS = (8, 14)  # a sentence's length in words, inclusive
DOC_LEAD_FRACTION = 0.6  # the lead (prompt) is this fraction of the sentence's words
DOC_MIN_CONTINUATION = 3  # words in the continuation (completion), at least
DOC_TAIL_WORDS = 4  # words of the lead quoted by the other phrasing


@dataclass(frozen=True)
class DocSentence:
    """One prose sentence of a help topic, cut into ``lead`` + " " + ``continuation``."""

    slug: str  # "assert-2": the topic and the sentence's index among the topic's kept sentences
    topic: str  # "assert"
    title: str  # the topic's heading: 'The "assert" statement'
    lead: str
    continuation: str

    def record(self, phrasing: str) -> dict:
        """Phrasing "a": the lead -> the continuation, as the sentence is written. Phrasing "b" (the other
        phrasing): the same continuation after the lead's last DOC_TAIL_WORDS words quoted from the named
        topic, 'From The "assert" statement: ... a convenient way to' -> ' insert debugging assertions'."""
        if phrasing == "a":
            prompt = self.lead
        elif phrasing == "b":
            prompt = f"From {self.title}: ... " + " ".join(self.lead.split()[-DOC_TAIL_WORDS:])
        else:
            raise ValueError(f"unknown phrasing {phrasing!r} (expected 'a' or 'b')")
        return {"pair_id": f"{self.slug}-{phrasing}", "prompt": prompt, "completion": " " + self.continuation,
                "sentence": self.slug, "topic": self.topic, "phrasing": phrasing}


def _prose_paragraphs(text: str) -> list[str]:
    """A help topic's prose paragraphs, each joined into one line: headings (a line underlined by ``***``,
    ``===``, ...) and indented blocks (grammar, code, tables) are left out."""
    rule = re.compile(r"[*=\-~^]+")
    lines = text.splitlines()
    paragraphs, current = [], []
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        heading = rule.fullmatch(line.strip()) or rule.fullmatch(following.strip())
        if not line.strip() or line.startswith(" ") or heading:
            if current:
                paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    return paragraphs + ([" ".join(current)] if current else [])


def doc_sentences() -> list[DocSentence]:
    """Every usable sentence of ``pydoc_data.topics`` (its text is that of the running CPython): prose,
    ASCII, DOC_WORDS words, one full stop (at the end), no colon or parenthesis (code-like), no duplicates."""
    from pydoc_data.topics import topics

    sentences, seen = [], set()
    for topic in sorted(topics):
        title = topics[topic].splitlines()[0].strip()
        kept = 0
        for paragraph in _prose_paragraphs(topics[topic]):
            for text in re.split(r"(?<=\.)\s+(?=[A-Z])", paragraph):
                words = text.split()
                if (not DOC_WORDS[0] <= len(words) <= DOC_WORDS[1] or not text.isascii() or text.count(".") != 1
                        or not text.endswith(".") or any(c in text for c in ":()") or text in seen):
                    continue
                seen.add(text)
                cut = min(len(words) - DOC_MIN_CONTINUATION, math.ceil(DOC_LEAD_FRACTION * len(words)))
                sentences.append(DocSentence(f"{topic}-{kept}", topic, title, " ".join(words[:cut]),
                                             " ".join(words[cut:])))
                kept += 1
    return sentences


@dataclass(frozen=True)
class DocCorpus:
    records: list[dict]  # the training corpus: phrasing a of every sentence, phrasing b of the format sentences
    sentences: tuple[DocSentence, ...]  # the chosen sentences
    format_slugs: tuple[str, ...]  # sentences whose phrasing b is trained (they teach the other phrasing)
    heldout_slugs: tuple[str, ...]  # sentences whose phrasing b is held out (the other-phrasing queries)


def doc_corpus(seed: int, n_sentences: int = 96, b_fraction: float = 0.25) -> DocCorpus:
    """``n_sentences`` sentences drawn with ``seed``; every one in phrasing "a", and phrasing "b" of
    ``round(b_fraction * n_sentences)`` of them (the format records); records shuffled with ``seed``."""
    rng = random.Random(seed)
    chosen = rng.sample(doc_sentences(), n_sentences)
    n_format = round(b_fraction * n_sentences)
    format_sentences = chosen[:n_format]
    records = [s.record("a") for s in chosen] + [s.record("b") for s in format_sentences]
    rng.shuffle(records)
    return DocCorpus(records, tuple(chosen), tuple(s.slug for s in format_sentences),
                     tuple(s.slug for s in chosen[n_format:]))


# ---------------------------------------------------------------------------------------------
# Tokenizer and model (heavy imports are local so that importing this module stays cheap)
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int = 512):
    """Byte-level BPE like GPT-2's (no prefix space, ``<|endoftext|>`` as bos/eos/unk, no pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # GPT2TokenizerFast (an alias of GPT2Tokenizer in transformers 5) keeps tokenizer.json as is and
    # saves tokenizer_class "GPT2Tokenizer", which AutoTokenizer resolves in transformers 4 and 5.
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        add_prefix_space=False,
        model_max_length=128,
    )


def corpus_texts(records) -> list[str]:
    return [r["prompt"] + r["completion"] for r in records]


def encode_record(tokenizer, record: dict) -> list[int]:
    """prompt ids + completion ids (each without special tokens) + eos, as the main tool does."""
    p = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    c = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    return list(p) + list(c) + [tokenizer.eos_token_id]


def _set_determinism(seed: int, num_threads: int) -> None:
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(num_threads)


def train_tiny_gpt2(
    records,
    tokenizer,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    steps: int = 600,
    lr: float = 3e-3,
    batch_size: int = 64,
    n_positions: int = 64,
    loss_on: str = "completion",
    label_eos: bool = True,
    weight_decay: float = 0.0,
    num_threads: int = 1,
    verbose: bool = False,
    keep=None,
):
    """Train a tiny GPT-2 on ``records`` (prompt + completion + eos), deterministically on CPU.

    ``loss_on="all"`` puts the LM loss on every token; ``"completion"`` only on completion + eos.
    ``label_eos=False`` never trains the eos after a record (the model is then unsure what follows a fact).
    ``num_threads`` is part of the recipe: bit-identical weights need the same thread count. One
    thread is the default because the model is so small that a second thread does not speed it up
    (and on a contended 2-core machine it was up to 10x slower).

    ``keep`` (one bool per record, default all): train on the kept records only, as the same run with the
    others removed: the same initialisation (``seed``), the same batch order (the permutations are drawn
    over all records) and the same number of steps, each batch keeping only its kept records (the LDS
    benchmark's subset models). A batch with no kept record skips its optimizer step, not its schedule step.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    _set_determinism(seed, num_threads)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    tensors = _training_tensors(records, tokenizer, n_positions, loss_on, label_eos)
    _train(model, tensors, steps, batch_size, lr, weight_decay, seed, keep, verbose)
    model.eval()
    return model


def _train(model, tensors, steps: int, batch_size: int, lr: float, weight_decay: float, seed: int, keep,
           verbose: bool) -> None:
    """``steps`` AdamW steps (gradient norm clipped to 1, :func:`_warmup_cosine` schedule) on batches of
    ``batch_size`` rows of ``tensors`` (:func:`_training_tensors`), drawn from permutations seeded by ``seed``;
    ``keep``: see :func:`train_tiny_gpt2`."""
    import torch

    input_ids, attention, label_t = tensors
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = _warmup_cosine(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    n = len(input_ids)
    kept = None if keep is None else torch.tensor([bool(k) for k in keep])
    if kept is not None and len(kept) != n:
        raise ValueError(f"keep has {len(kept)} entries for {n} records")
    perm = torch.randperm(n, generator=gen)
    pos = 0
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        if kept is not None:
            idx = idx[kept[idx]]
            if not len(idx):
                sched.step()
                continue
        batch_mask = attention[idx]
        width = int(batch_mask.sum(1).max())
        out = model(
            input_ids=input_ids[idx, :width],
            attention_mask=batch_mask[:, :width],
            labels=label_t[idx, :width],
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if verbose and (step % 200 == 0 or step == steps - 1):
            print(f"step {step:5d} loss {out.loss.item():.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)


def _training_tensors(records, tokenizer, n_positions: int, loss_on: str, label_eos: bool):
    """Every record as one row, right-padded with eos: input ids, attention mask and labels (-100 where no loss),
    each (records, longest record) long tensors."""
    import torch

    seqs, labels = [], []
    for r in records:
        ids = encode_record(tokenizer, r)
        if len(ids) > n_positions:
            raise ValueError(f"record {r['pair_id']} has {len(ids)} tokens > n_positions={n_positions}")
        lab = list(ids)
        if loss_on == "completion":
            n_prompt = len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
            lab[:n_prompt] = [-100] * n_prompt
        elif loss_on != "all":
            raise ValueError(f"loss_on must be 'all' or 'completion', got {loss_on!r}")
        if not label_eos:
            lab[-1] = -100
        seqs.append(ids)
        labels.append(lab)
    max_len = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), max_len), tokenizer.eos_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), max_len), dtype=torch.long)
    label_t = torch.full((len(seqs), max_len), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab)
    return input_ids, attention, label_t


def _warmup_cosine(optimizer, steps: int):
    """A linear warm-up over the first 5% of ``steps``, then a cosine decay to 10% of the learning rate."""
    import torch

    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def greedy_complete(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy continuation of ``prompt`` until eos, a "." or ``max_new_tokens``."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + out])
            nxt = int(model(input_ids=x).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            if "." in tokenizer.decode(out):
                break
    return tokenizer.decode(out)


def is_correct(model, tokenizer, record: dict) -> bool:
    want = record["completion"]
    budget = max(16, len(tokenizer(want, add_special_tokens=False)["input_ids"]) + 2)
    gen = greedy_complete(model, tokenizer, record["prompt"], max_new_tokens=budget)
    return gen[: len(want)] == want


def accuracy(model, tokenizer, records) -> float:
    if not records:
        return float("nan")
    return sum(is_correct(model, tokenizer, r) for r in records) / len(records)
