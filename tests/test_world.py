"""The embedded world's real engine misses as real retrievers do: facts stated in several phrasings, more
passages about each entity, the query forms a policy can write, and the out-of-domain questions."""
import collections
import random

import world


def test_a_world_without_phrasings_or_passages_is_the_world_of_one_sentence_a_fact():
    plain, same = world.build_world(0, 300, 90), world.build_world(0, 300, 90, phrasings=1, passages=0)
    assert plain == same
    templates = {r: t for r, (t, _, _) in world.RELATIONS.items()}
    for q in plain.test + plain.train:
        if q["hops"] == 1 and q["relation"] != "company":
            assert q["evidence"] == [templates[q["relation"]].format(s=q["subject"], o=q["golden_answers"][0])]
    assert {q["hops"] for q in plain.test} == {1, 2}  # no out-of-domain questions


def test_phrasings_state_each_fact_once_and_passages_name_their_entity_without_stating_a_fact():
    w = world.build_world(0, 300, 90, phrasings=3, passages=4)
    facts = [d for d in w.docs if world.parse_doc(d)]
    others = [d for d in w.docs if not world.parse_doc(d)]
    assert len(facts) == len(set(facts)) == 2 * 300 + 3 * 90  # persons: 2 facts, companies: 3
    assert len(others) == 4 * (300 + 90)
    for q in w.train + w.test:
        if q["hops"] == 1:
            stated = q["evidence"][0]
            assert stated in w.docs and world.answer_from_doc(stated, q["relation"]) == q["golden_answers"][0]
    names = {q["subject"] for q in w.train + w.test}
    assert all(any(n in d for n in names) for d in others)
    assert {len(world.parse_doc(d)[0].split()) for d in facts} == {2}
    used = collections.Counter(next(i for i, t in enumerate([world.RELATIONS[r][0]] + world.PHRASINGS[r])
                                    if world._pattern(t).match(d)) for d in facts for r in [world.parse_doc(d)[1]])
    assert set(used) == {0, 1, 2} and min(used.values()) > len(facts) / 5  # every phrasing is used, none rarely


def test_out_of_domain_questions_ask_the_test_facts_in_words_no_train_question_uses():
    w = world.build_world(0, 300, 90, phrasings=2)
    ood = [q for q in w.test if q["hops"] == 0]
    single = [q for q in w.test if q["hops"] == 1 and q["relation"] in world.OOD_QUESTIONS]
    assert len(ood) == len(single) > 0
    train_words = {word for q in w.train for word in q["question"].split()} - {q["subject"] for q in w.train}
    for q, src in zip(ood, single):
        assert (q["subject"], q["golden_answers"], q["evidence"]) == (src["subject"], src["golden_answers"], src["evidence"])
        assert set(q["question"].split()) - set(q["subject"].split()) - train_words  # a word no train question has


def test_query_form_names_each_formulation_of_either_hop_and_nothing_else():
    w = world.build_world(0, 300, 90, phrasings=3)
    two = next(q for q in w.test if q["hops"] == 2)
    (s1, r1), (s2, r2) = world.hops_of(two)
    assert s2 == two["bridge"] and world.RELATIONS[r1] and world.RELATIONS[r2]
    for i, (s, r) in enumerate(world.hops_of(two)):
        for form, text in world.formulations(s, r, 3, two["question"] if i == 0 else None).items():
            assert world.query_form(text, two, 3) == form
    assert world.formulations(s2, "birthplace", 3)["synonyms"] == f"{s2} born native hometown"
    assert world.query_form("born native hometown", two, 3) == world.query_form("Nobody Atall", two, 3) == "other"


def test_retrieval_stats_count_a_question_found_only_where_its_document_is_in_the_results():
    w = world.build_world(0, 300, 90, phrasings=3)

    def search(query):  # finds a document only for the synonyms form
        words = query.split()
        return [d for d in w.docs if " ".join(words[:2]) in d][:3] if len(words) > 3 else ["nothing"]
    stats = world.retrieval_stats(w, search, 3, n=50)
    assert stats["single-hop"]["question"] == stats["single-hop"]["name"] == 0.0
    assert stats["two-hop"]["two-hop question"] == 0.0
    truth = [q["evidence"][0] in search(world.formulations(q["subject"], q["relation"], 3)["synonyms"])
             for q in [q for q in w.test if q["hops"] == 1][:50]]
    assert stats["single-hop"]["synonyms"] == stats["single-hop"]["best"] == sum(truth) / 50 > 0


def test_mixed_warm_up_queries_take_every_form_alike_and_search_again_only_after_a_miss():
    w = world.build_world(0, 300, 90, phrasings=3, passages=4)
    names = collections.defaultdict(list)
    for q in w.train:
        if q["hops"] == 1:
            names[world.SUBJECT_TYPE[q["relation"]]].append(q["subject"])
    rng, forms, again = random.Random(0), collections.Counter(), 0

    def search(query):  # the documents that hold the query's first two words, as a stand-in engine
        return [d for d in w.docs if " ".join(query.split()[:2]) in d][:3]
    for q in [q for q in w.train if q["hops"] == 1][:400]:
        text, queries = world.warmup_trajectory(q, search, lambda d: " | ".join(d), names, rng, phrasings=3, budget=2)
        forms.update(world.query_form(x, q, 3) for x in queries)
        assert len(queries) <= 2 and text.count("<search>") == len(queries)
        if len(queries) == 2:
            again += 1
            assert q["evidence"][0] not in search(queries[0]) and queries[1] != queries[0]
    right = [forms[f] for f in ("question", "keyword", "synonyms", "name")]
    assert min(right) > 0.6 * max(right) and again > 0  # no form favoured; a miss is sometimes searched again
