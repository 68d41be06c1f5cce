"""The reward and the metrics: SQuAD normalisation, the answer read from a response, F1 (the
training reward), strict EM and substring EM (what the paper's tables call EM)."""
import collections
import re
import string


def normalize_answer(text):
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse white space."""
    text = "".join(ch for ch in str(text).lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def extract_answer(response_text):
    """The text inside the last <answer>...</answer> of the response, or None. Pass the
    *response* only: the prompt holds example tags that must never be scored."""
    found = re.findall(r"<answer>(.*?)</answer>", response_text or "", flags=re.DOTALL)
    return found[-1].strip() if found else None


def f1_score(prediction, golds):
    """Word-level F1 (SQuAD), max over the gold answers; 0 for no answer."""
    if prediction is None:
        return 0.0
    pred, best = normalize_answer(prediction).split(), 0.0
    for gold in golds:
        gold = normalize_answer(gold).split()
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def exact_match(prediction, golds):
    """Strict EM: the normalised prediction equals a normalised gold answer."""
    return float(prediction is not None and normalize_answer(prediction) in {normalize_answer(g) for g in golds})


def substring_match(prediction, golds):
    """What the paper's tables call EM (the official code's check): a normalised gold answer occurs
    in the normalised prediction, as a plain substring ("1990" is in "1990s")."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(g) in pred for g in golds if normalize_answer(g)))
