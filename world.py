"""The data side of zerosearch: the embedded synthetic world (facts, corpus, questions), the
tokenizer and tiny models built for it, and loaders for real QA data sets.

The synthetic world stands in for Wikipedia + NQ/HotpotQA so that everything runs offline on a
CPU. Every name is a made-up word made of common syllables, and every word is one token, so a
small model can learn to *copy* names it has never seen (held-out entities) instead of
memorising them: what transfers to the test set is the skill of searching, not the facts.
"""
import collections
import json
import os
import random
import re

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from reward import substring_match

TAGS = ["<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>"]

# (relation, subject type, object type): the sentence the corpus states, the question asked,
# and the words a good search query adds to the subject's name.
RELATIONS = {
    "birthplace": ("{s} was born in {o} .", "Where was {s} born ?", "born"),
    "birthyear": ("{s} was born in the year {o} .", "In what year was {s} born ?", "born year"),
    "founder": ("{s} was founded by {o} .", "Who founded {s} ?", "founded by"),
    "headquarters": ("{s} is headquartered in {o} .", "Where is {s} headquartered ?", "headquartered"),
    "foundedyear": ("{s} was founded in the year {o} .", "In what year was {s} founded ?", "founded year"),
    "company": ("{o} was founded by {s} .", "Which company did {s} found ?", "founded by"),
}
# Other ways a corpus states each fact, the value last as in the first (world_phrasings: how many of
# [the first, *these] a world uses). Real text says one thing in several words, and a question asks in
# one of them: BM25 then misses the passages that say it otherwise.
PHRASINGS = {
    "birthplace": ["{s} is a native of {o} .", "the hometown of {s} is {o} ."],
    "birthyear": ["the birth year of {s} is {o} .", "{s} came into the world in {o} ."],
    "founder": ["{s} was started by {o} .", "the creator of {s} is {o} ."],
    "headquarters": ["{s} has its head office in {o} .", "the main office of {s} is in {o} ."],
    "foundedyear": ["{s} was established in {o} .", "{s} dates from {o} ."],
}
# The out-of-domain questions: each relation asked in the words of its other phrasings, never in
# the warm-up's or RL's questions (worlds with world_phrasings of 2 or more).
OOD_QUESTIONS = {
    "birthplace": "What is the hometown of {s} ?", "birthyear": "What is the birth year of {s} ?",
    "founder": "Who is the creator of {s} ?", "headquarters": "Where is the main office of {s} ?",
    "foundedyear": "When was {s} established ?",
}
# Passages that name an entity without stating what a question about it asks (a corpus holds many
# about each entity: world_passages of them): some use a question's words about something else, a
# relative's birth or a branch's office, as real passages about an entity's family or subsidiaries do.
OTHER_PASSAGES = {
    "person": ["a daughter of {s} was born in {city} .", "a son of {s} was born in the year {year} .",
               "{s} visited {city} in the year {year} .", "{s} met {person} in {city} .",
               "{s} lived in {city} for many years .", "{s} worked for {company} ."],
    "company": ["a branch of {s} is headquartered in {city} .", "a rival of {s} was founded by {person} .",
                "{s} opened a store in {city} in the year {year} .", "{s} was sold to {company} .",
                "a unit of {s} was founded in the year {year} .", "{s} hired {person} ."],
}
# Two-hop questions: (template, first relation from the subject, second relation from the bridge).
TWO_HOP = {
    "founder_birthplace": ("Where was the founder of {s} born ?", "founder", "birthplace"),
    "founder_birthyear": ("In what year was the founder of {s} born ?", "founder", "birthyear"),
    "company_headquarters": ("Where is the company founded by {s} headquartered ?", "company", "headquarters"),
}


TEST_SETS = {"single-hop": 1, "two-hop": 2, "out-of-domain": 0}  # evaluation set -> its questions' `hops`


# docs: the corpus, one sentence per fact; train and test: questions, each {"question", "golden_answers", "hops",
# "evidence", "subject", "relation"}
World = collections.namedtuple("World", ["docs", "train", "test"])


def world_of(cfg):
    """The world a config describes."""
    return build_world(cfg["world_seed"], cfg["world_persons"], cfg["world_companies"], phrasings=cfg["world_phrasings"],
                       passages=cfg["world_passages"])


def make_words(rng, n, syllables, used):
    """n distinct capitalised pseudo-words of `syllables` syllables, none in `used`."""
    onsets, vowels, codas = "b d f g k l m n p r s t v z br dr kr st tr".split(), "a e i o u ai ou".split(), ["", "n", "r", "l", "s"]
    words = []
    while len(words) < n:
        w = ("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(codas)).capitalize()
        if w not in used:
            used.add(w)
            words.append(w)
    return words


def build_world(seed=0, n_persons=4000, n_companies=1200, test_fraction=0.15, phrasings=1, passages=0):
    """Generate the world: persons (born in a city, in a year), companies (founded by a person,
    headquartered in a city, founded in a year), one document per fact, and single-hop and
    two-hop questions whose subjects are split into disjoint train and test entities. With
    `phrasings` > 1 each fact is stated in one of that many phrasings (PHRASINGS) and the test set
    holds out-of-domain questions too (hops 0: OOD_QUESTIONS); `passages` more documents name each
    entity without stating a fact a question asks (OTHER_PASSAGES). Both draw from a stream of their
    own, so a world without them is the same as before they existed."""
    rng, used = random.Random(seed), set()
    extra = random.Random(f"{seed} phrasings {phrasings} passages {passages}")
    # first names, last names, cities and company stems: (how many, syllables)
    firsts, lasts, cities, stems = [make_words(rng, n, k, used) for n, k in [(80, 2), (80, 3), (120, 3), (150, 2)]]
    suffixes = "Labs Works Group Systems Holdings Foods Motors Media Energy Textiles".split()
    persons = rng.sample([f"{a} {b}" for a in firsts for b in lasts], n_persons)
    companies = rng.sample([f"{a} {b}" for a in stems for b in suffixes], n_companies)
    facts = {}  # (subject, relation) -> object
    for p in persons:
        facts[p, "birthplace"], facts[p, "birthyear"] = rng.choice(cities), str(rng.randint(1800, 1960))
    founders = rng.sample(persons, n_companies)
    for c, p in zip(companies, founders):
        facts[c, "founder"], facts[p, "company"] = p, c
        facts[c, "headquarters"], facts[c, "foundedyear"] = rng.choice(cities), str(rng.randint(1850, 1999))
    stated = {(s, r): ([RELATIONS[r][0]] + PHRASINGS[r])[extra.randrange(phrasings)].format(s=s, o=o)
              for (s, r), o in facts.items() if r != "company"}  # the document that states each fact
    docs = list(stated.values())
    rng.shuffle(docs)
    if passages:
        fill = dict(city=cities, year=[str(y) for y in range(1800, 2000)], person=persons, company=companies)
        for entities, kind in ((persons, "person"), (companies, "company")):
            docs += [t.format(s=e, **{k: extra.choice(v) for k, v in fill.items()})
                     for e in entities for t in extra.sample(OTHER_PASSAGES[kind], passages)]
        extra.shuffle(docs)

    def doc(s, r):  # "which company did P found" is answered by the company's founder document
        return stated[facts[s, r], "founder"] if r == "company" else stated[s, r]

    def answers(o):  # aliases where natural: a company is also called by its stem
        return [o, o.split()[0]] if o in facts.values() and o.split()[-1] in suffixes else [o]

    # Test entities: a company, its founder and the founder's facts are held out together.
    test_companies = set(rng.sample(companies, int(test_fraction * n_companies)))
    test_persons = {facts[c, "founder"] for c in test_companies}
    test_persons |= set(rng.sample([p for p in persons if p not in test_persons], int(test_fraction * n_persons) - len(test_persons)))
    questions = [dict(question=RELATIONS[r][1].format(s=s), golden_answers=answers(o), hops=1, evidence=[doc(s, r)],
                      subject=s, relation=r) for (s, r), o in facts.items()]
    for name, (template, r1, r2) in TWO_HOP.items():
        for s in companies if r1 == "founder" else founders:
            bridge = facts[s, r1]
            questions.append(dict(question=template.format(s=s), golden_answers=answers(facts[bridge, r2]), hops=2,
                                  evidence=[doc(s, r1), doc(bridge, r2)], subject=s, relation=name, bridge=bridge))
    held_out = test_persons | test_companies
    train = [q for q in questions if q["subject"] not in held_out]
    test = [q for q in questions if q["subject"] in held_out]
    rng.shuffle(train)
    rng.shuffle(test)
    if phrasings > 1:
        test += [dict(q, question=OOD_QUESTIONS[q["relation"]].format(s=q["subject"]), hops=0)
                 for q in test if q["relation"] in OOD_QUESTIONS and q["hops"] == 1]
    return World(docs=docs, train=train, test=test)


def _pattern(template):
    pattern = re.escape(template).replace(r"\{s\}", r"(?P<s>\S+ \S+)").replace(r"\{o\}", r"(?P<o>\S+(?: \S+)?)")
    return re.compile(pattern + "$")


PATTERNS = [(r, _pattern(t)) for r, ts in PHRASINGS.items() for t in [RELATIONS[r][0]] + ts]  # no sentence fits two


def parse_doc(doc):
    """(subject, relation, object) of a corpus sentence, or None if it states no known fact."""
    for relation, pattern in PATTERNS:
        if m := pattern.match(doc.strip()):
            return m["s"], relation, m["o"]
    return None


def answer_from_doc(doc, relation):
    """The value a question of `relation` would take from `doc` (right or wrong): the founder
    sentence answers "which company" with its subject, every other question with its object."""
    fact = parse_doc(doc)
    return None if fact is None else fact[0] if relation == "company" else fact[2]


SUBJECT_TYPE = {"birthplace": "person", "birthyear": "person", "company": "person",
                "founder": "company", "headquarters": "company", "foundedyear": "company"}


def find_fact(docs, subject, relation):
    """The value `relation` of `subject` as stated by one of `docs`, or None: reading a result
    list the way a reader who can read would (the founder sentence answers "which company")."""
    for s, r, o in filter(None, map(parse_doc, docs)):
        if relation == "company" and r == "founder" and o == subject:
            return s
        if r == relation and s == subject:
            return o
    return None


STOP_WORDS = {"the", "of", "is", "in", "was", "a", "its", "by", "into", "from", "has"}


def relation_words(relation, phrasings):
    """The words the corpus uses for `relation` in its first `phrasings` phrasings, names and small words
    left out: "born native hometown" for birthplace in three."""
    r = "founder" if relation == "company" else relation  # the founder documents answer both
    texts = [t.replace("{s}", "").replace("{o}", "") for t in ([RELATIONS[r][0]] + PHRASINGS[r])[:phrasings]]
    return " ".join(dict.fromkeys(w for t in texts for w in re.findall(r"[a-z]+", t) if w not in STOP_WORDS))


FORMS = ["question", "keyword", "synonyms", "name", "other"]  # world.query_form's names


def formulations(subject, relation, phrasings, question=None):
    """The queries a policy could write for one hop about `subject`, by form: the question copied (the
    one-hop question, or `question` itself, a two-hop question's first search), the name with the
    question's words for the relation, the name with every word the corpus uses for it, the name alone. (BM25
    finds the copied one-hop question less often than the name with every word for the relation.)"""
    _, asked, keywords = RELATIONS[relation]
    return {"question": question or asked.format(s=subject), "keyword": f"{subject} {keywords}",
            "synonyms": f"{subject} {relation_words(relation, phrasings)}", "name": subject}


def hops_of(q):
    """[(subject, relation)] of each hop of question q: one, or two through the bridge entity."""
    if q["hops"] != 2:
        return [(q["subject"], q["relation"])]
    return [(q["subject"], TWO_HOP[q["relation"]][1]), (q["bridge"], TWO_HOP[q["relation"]][2])]


def hop_formulations(q, phrasings):
    """The `formulations` of each of q's hops (`hops_of`); the first hop's "question" copies q's own question."""
    return [formulations(s, r, phrasings, q["question"] if i == 0 else None) for i, (s, r) in enumerate(hops_of(q))]


def query_form(query, q, phrasings):
    """The form of `query` (a key of `formulations`) for one of q's hops, or "other" (vague, another entity)."""
    return next((form for way in hop_formulations(q, phrasings) for form, text in way.items() if text == query.strip()),
                "other")


def retrieval_stats(world, search, phrasings, n=400):
    """How often a real engine finds what a question needs: for n held-out questions of each set, the
    share whose answer-bearing document is among `search(query)`'s results, by query form -> {set:
    {form: share}}. A two-hop question is searched in two searches of one form (the first "question" copies
    it whole), the second about the bridge entity, both of which must find their document, or as a copy of
    itself alone ("two-hop question": one search); "best" is the best form of each question."""
    out = {}
    for name, hops in TEST_SETS.items():
        found = collections.defaultdict(list)
        for q in [q for q in world.test if q["hops"] == hops][:n]:
            ways = hop_formulations(q, phrasings)
            hits = {form: all(q["evidence"][i] in search(way[form]) for i, way in enumerate(ways)) for form in ways[0]}
            if hops == 2:
                hits["two-hop question"] = q["evidence"][1] in search(q["question"])
            for form, hit in [*hits.items(), ("best", any(hits.values()))]:
                found[form].append(hit)
        out[name] = {form: sum(v) / len(v) for form, v in found.items()}
    return out


def warmup_trajectory(q, search, information, names, rng, phrasings=1, budget=2, p_right=0.6, p_vague=0.25):
    """One warm-up response for question q, searching the real engine.

    Each query names the right entity with probability p_right, is vague (keywords only) with
    p_vague and names another train entity otherwise. The results are shown in a random order, not
    the engine's ranking, and the answer is read from the result that states the fact, or else is
    the value of a random result about the relation: so no position holds the answer more often than
    another, and the answer is right only when every query was. (With ranked results, or with the
    first result's value as the fallback, the tiny policy learned to copy Doc 1, which BM25 ranks
    right for a right query and the simulator does not.) A <think> after each search copies the
    result it reads whole, before the next action takes the value from it: finding the sentence is
    then one skill for every kind of question, and the value stands a few tokens back, wherever the
    result stood. (Without the quote, a value after the relation, `born in X`, and a name before it,
    `X was founded by P`, were two ways of reading, and the tiny policy learned one of them at a
    time.) `names[type]` lists train entities only.

    A query about the right entity takes any of its `formulations` (in a world stated in `phrasings`
    phrasings) with equal chance (a two-hop question's first search may copy the whole question), as
    a prompted base model writes queries, none favoured for working best on this engine; and a
    search whose results do not state the fact is followed, half the time, by a search in another
    form, while the trajectory's `budget` of searches (max_turns) leaves room for the hops still to
    come. Returns the response text and its queries."""
    hops = [q["relation"]] if q["hops"] == 1 else list(TWO_HOP[q["relation"]][1:])
    text, subject, queries = "<think> I need to search . </think>", q["subject"], []
    for h, relation in enumerate(hops):
        u = rng.random()
        entity = subject if u < p_right + p_vague else rng.choice(names[SUBJECT_TYPE[relation]])  # vague: no name
        forms = formulations(entity, relation, phrasings, q["question"] if h == 0 and q["hops"] == 2 else None)
        query = RELATIONS[relation][2] if p_right <= u < p_right + p_vague else rng.choice(list(forms.values()))
        while True:
            docs = search(query)
            docs = rng.sample(docs, len(docs))  # a random order: the answer is read, not ranked first
            queries.append(query)
            text += f" <search> {query} </search>{information(docs)}"
            stating = [(v, d) for d in docs if (v := find_fact([d], subject, relation))]
            others = [f for f in forms.values() if f not in queries]
            room = budget - len(queries) - (len(hops) - 1 - h)  # searches left after the hops to come
            if not (u < p_right and not stating and room > 0 and others and rng.random() < 0.5):
                break
            query = rng.choice(others)  # search again, in another form
        # (the value read, the result it is read from): the result stating the fact, else a random one's value
        guess = rng.choice([(v, d) for d in docs if (v := answer_from_doc(d, relation))] or [(subject, None)])
        subject, doc = stating[0] if stating else guess
        if doc:
            text += f" <think> {doc} </think>"
    return text + f" <answer> {subject} </answer>", queries


def build_tokenizer(texts):
    """A word-level tokenizer for the world's text, wrapped as a Hugging Face fast tokenizer.

    Text is split on white space and punctuation, and every word of `texts` is one token (ids in
    sorted order, so a build is the same in every process: a trained BPE breaks ties between
    merges in hash order and gave different ids from run to run). One token a name part is what
    lets a small model copy names it has never seen. The tags are atomic added tokens, so
    `</search>` is one token and a stop string ends exactly at it. Decoding puts one space
    between words; a word not in `texts` becomes <unk>."""
    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)} - set(TAGS))
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def load_tokenizer(path):
    """AutoTokenizer, except for a tokenizer built here: AutoTokenizer would swap in the model
    type's own tokenizer class (Qwen2's byte-level one) and change the tokenisation."""
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config) and json.load(open(config)).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def copy_sequences(vocab_size, first_id, n, seed):
    """n (token ids, loss mask) examples of 4-40 random words (ids first_id .. vocab_size - 1) written twice, the
    loss on the second copy: the task that forms induction heads (attend to the word after the current word's
    last occurrence, and copy it), which an LLM's pretraining forms early (Olsson et al., 2022). A tiny model
    without them copies one word where its training put one, and miscopies a two-word name."""
    rng, examples = random.Random(seed), []
    for _ in range(n):
        x = [rng.randrange(first_id, vocab_size) for _ in range(rng.randint(4, 40))]
        examples.append((x + x, [0] * len(x) + [1] * len(x)))
    return examples


def tiny_model(vocab_size, hidden_size, layers, heads, seed):
    """A small Qwen2 (the Qwen2.5 architecture), built from config: it runs through exactly the
    code path of a real Hugging Face model."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=3 * hidden_size, pad_token_id=0,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=2, bos_token_id=2)
    return Qwen2ForCausalLM(config)


def read_jsonl(path):
    """(line number, object) for each line of a JSONL file, one at a time (a corpus of millions of lines
    is never held twice; a progress bar shows when reading takes a while); blank lines are skipped,
    any other line that is not a JSON object (or not UTF-8) is one clear error."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a folder; name a JSONL file, one JSON object a line")
    with open(path, "rb") as f:
        for n, raw in enumerate(tqdm(f, desc=f"reading {os.path.basename(path)}", unit=" lines", delay=2), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SystemExit(f"error: {path}:{n}: not UTF-8 text; save the file as UTF-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise SystemExit(f"error: {path}:{n}: not a JSON object; the file must hold one JSON object a line")
            yield n, row


def load_questions(path):
    """Questions from a FlashRAG JSONL file (`question`, `golden_answers`) or a Search-R1 /
    ZeroSearch parquet file (`question`, `golden_answers` or `reward_model.ground_truth.target`).
    Each becomes {"question", "golden_answers", "hops"}; a single answer may be a string or a number."""
    if not os.path.exists(path):
        raise SystemExit(f"error: data file not found: {path} (set data=... / eval_data=... to an existing file)")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"error: reading {path} needs pyarrow: pip install pyarrow (or convert it to JSONL)")
        rows = [(f"row {n}", r) for n, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    else:
        rows = read_jsonl(path)
    out = []
    for n, r in rows:
        question, golds = r.get("question"), r.get("golden_answers")
        if golds is None:
            golds = ((r.get("reward_model") or {}).get("ground_truth") or {}).get("target")
        golds = [golds] if isinstance(golds, (str, int, float)) and not isinstance(golds, bool) else golds
        if not isinstance(question, str) or not question.strip():
            raise SystemExit(f"error: {path}:{n}: question is {json.dumps(question, default=str)}; "
                             "each row needs a non-empty question string")
        if not (isinstance(golds, list) and golds and all(isinstance(g, (str, int, float)) and not isinstance(g, bool)
                                                          and str(g).strip() for g in golds)):
            raise SystemExit(f"error: {path}:{n}: golden_answers is {json.dumps(golds, default=str)}; "
                             "each row needs a non-empty list of non-empty answer strings")
        out.append(dict(question=question.strip(), golden_answers=[str(g) for g in golds], hops=1, evidence=[]))
    if not out:
        raise SystemExit(f"error: {path}: no questions in the file; write one JSON object a line with question and golden_answers")
    return out


def load_corpus(path):
    """A JSONL corpus, one document a line: {"contents": ...} (FlashRAG) or {"text": ...}."""
    if not os.path.exists(path):
        raise SystemExit(f"error: corpus file not found: {path} (set corpus=... to a JSONL file)")
    docs = []
    for n, r in read_jsonl(path):
        text = r.get("contents", r.get("text"))
        if not isinstance(text, str):
            raise SystemExit(f"error: {path}:{n}: no `contents` (or `text`) string; write each document as {{\"contents\": \"...\"}}")
        docs.append(text.replace("\n", " "))
    if not any(c.isalnum() for d in docs for c in d):  # stops at the first word: a corpus BM25 can search
        raise SystemExit(f"error: {path}: no documents in the corpus hold a word; write one {{\"contents\": \"...\"}} a line")
    return docs


def knowledge_index(docs):
    """The tiny simulator's knowledge: `knowledge(query, answers)` -> every document of the corpus that
    names an entity the query names (by exact name): its facts and the other passages about it, those
    that state one of `answers` (the question's, which the simulator's prompt holds) first, then the
    others in corpus order. A 14B simulator has memorised Wikipedia, every page about an entity, and
    recalls what bears on the question it is told; a 1M-parameter one cannot memorise the corpus in
    minutes, nor pick the one passage of eight that states the answer, so its prompt carries what it
    would know in that order. It is not a search engine: nothing for a query that names no entity, and
    a query about the wrong entity gets that entity's documents, never the answer."""
    names = {fact[0] for d in docs if (fact := parse_doc(d))}  # every entity is the subject of a fact
    about = collections.defaultdict(list)
    for d in docs:
        words = d.split()
        for name in names.intersection(" ".join(words[i:i + 2]) for i in range(len(words) - 1)):
            about[name].append(d)

    def knowledge(query, answers=()):
        words, found = query.split(), []
        for name in (" ".join(words[i:i + 2]) for i in range(len(words) - 1)):
            found += [d for d in about.get(name, []) if d not in found]
        return sorted(found, key=lambda d: not substring_match(d, answers))  # stable: corpus order within each
    return knowledge


def world_tokenizer(world, cfg):
    """The embedded default's tokenizer: every word of the world's documents, its questions and the
    config's templates, so no word is unknown."""
    fixed = [cfg["prompt_template"], cfg["direct_template"], cfg["invalid_action"], cfg["sim_template_finetuned"], cfg["sim_template_prompted"], cfg["sim_template_prompted_noisy"],
             "<think> I need to search . </think> Question : Answer : useful noisy Useful Noisy " + " ".join(f"Doc {i}:" for i in range(1, 21))]
    return build_tokenizer(world.docs + [q["question"] for q in world.train + world.test] + fixed)
