"""User satisfaction signals in conversations (SPUR rubrics as used by WildFeedback, Shi et al.,
arXiv 2408.15549): the 18 categories, a lexical rule classifier, the LLM judge's prompt and parsers,
checklist parsing and Cohen's kappa. Pure functions only; the recipe (jaxlm.recipes.wildfeedback)
does the I/O.

A user turn that follows an assistant turn gets a set of categories; its polarity is

    dsat  if any DSAT category is present (a "thanks, but shorter please" asks for a change),
    sat   else if any SAT category is present,
    none  otherwise,

and agreement (rules vs judge, either vs the hand-labelled gold set) is Cohen's kappa on polarity.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from jaxlm.recipes.common import first_json

SAT = {
    "Gratitude": "the user thanks the assistant or expresses appreciation",
    "Learning": "the user says they learned something or now understand",
    "Compliance": "the user follows the assistant's suggestion or reports that it worked",
    "Praise": "the user praises the reply (great, perfect, exactly what I needed, not bad)",
    "Personal Details": "the user shares personal context to build on the reply",
    "Humor": "the user jokes or laughs (haha, lol)",
    "Acknowledgment": "the user briefly acknowledges the reply (ok, got it, makes sense) and goes on",
    "Positive Closure": "the user ends the conversation on a positive note (that's all, bye)",
    "Getting There": "the user says the reply is close or partly right and steers it further (almost, closer)",
}
DSAT = {
    "Negative Feedback": "the user says the reply is bad, useless or not helpful",
    "Revision": "the user asks to rewrite, redo or change the reply (try again, rewrite it, change X to Y)",
    "Factual Error": "the user points out a mistake, a wrong fact, or code that does not work or gives an error",
    "Unrealistic Expectation": "the user expects what the assistant cannot do (browse, real-time data, act in the world)",
    "No Engagement": "the user ignores the reply entirely and repeats the request unchanged",
    "Ignored": "the user says the assistant ignored or misread their request (I asked for, you didn't)",
    "Lower Quality": "the user says the reply is worse than an earlier one",
    "Insufficient Detail": "the user asks for more detail, depth, examples or a longer answer",
    "Style": "the user objects to the form: length, tone, format, language (too long, shorter, in a table)",
}
CATEGORIES = (*SAT, *DSAT)
POLARITIES = ("sat", "dsat", "none")


def polarity(categories: Sequence[str]) -> str:
    if any(c in DSAT for c in categories):
        return "dsat"
    if any(c in SAT for c in categories):
        return "sat"
    return "none"


# ----------------------------------------------------------------------------- rules
_NEG = r"(?:\bnot|\bno|n't|\bnever|\bhardly|\bnothing)"
# (category or None, pattern, category when negated or None): a cue preceded within three words by a
# negator takes the negated category ("not bad" is praise, "not great" negative feedback, "no error"
# nothing); a None category counts only negated.
RULES: tuple[tuple[str | None, str, str | None], ...] = (
    ("Gratitude", r"\b(thanks?|thank you|thx|ty|appreciate[ds]?|grateful)\b", None),
    ("Learning", r"\b(i (have )?learn(ed|t)|i see now|now i (understand|get it|see)|that explains|"
                 r"(very |so )?(informative|insightful)|til)\b", None),
    ("Compliance", r"\b(it|that|this) (works?|worked|fixed it|did the trick)\b|\b(works|worked) (now|perfectly|great)\b",
     "Factual Error"),
    ("Praise", r"\b(great|perfect|awesome|excellent|amazing|brilliant|fantastic|wonderful|nice|good job|"
               r"well done|love (it|this)|exactly what i)\b", "Negative Feedback"),
    (None, r"\b(bad|terrible)\b", "Praise"),  # only their negation ("not bad") counts
    ("Humor", r"(\bhaha+\b|\blol\b|\blmao\b|\brofl\b|:\)|😂)", None),
    ("Acknowledgment", r"^\s*(ok(ay)?|alright|got it|i see|understood|makes sense|sounds good|cool|sure|right)\b",
     None),
    ("Positive Closure", r"\b(that'?s all|bye|goodbye|have a (nice|good|great) (day|one)|see you)\b", None),
    ("Getting There", r"\b(almost|closer|getting there|on the right track|that'?s better|much better|"
                      r"better,? but|close,? but)\b", None),
    ("Negative Feedback", r"\b(useless|unhelpful|not helpful|nonsense|doesn'?t make sense|makes no sense|"
                          r"stupid|disappointed|garbage|you are (bad|terrible|wrong))\b|"
                          r"\b(terrible|awful|bad) (answer|response|reply|job)\b", None),
    ("Revision", r"\b(try again|redo|re-?write|rephrase|revise|regenerate|change (it|this|the)|modify|"
                 r"instead of|can you (make|change|fix)|please (fix|change|update)|update (it|the code))\b", None),
    ("Factual Error", r"\b(wrong|incorrect|inaccurate|mistake|not (true|correct|right|accurate)|"
                      r"that'?s not (right|true|correct|it)|doesn'?t work|does not work|not working|didn'?t work|error|exception|"
                      r"traceback|bug)\b", None),
    ("Unrealistic Expectation", r"\b(browse|search the (web|internet)|real[- ]time|live data|"
                                r"open (the|this) (link|url)|visit (the|this) (site|website|link))\b", None),
    ("Ignored", r"\b(i (asked|said|told you|wanted|meant)|you (didn'?t|did not|forgot|missed|ignored)|"
                r"that'?s not what i|not what i (asked|wanted|meant)|you still)\b", None),
    ("Lower Quality", r"\b(worse|previous (one|answer|version) was better|went backwards)\b", None),
    ("Insufficient Detail", r"\b(more detail(ed|s)?|in detail|elaborate|expand (on|it|this)|go deeper|"
                            r"more (specific|examples|information|info)|be more specific|longer|explain further|"
                            r"tell me more)\b", None),
    ("Style", r"\b(too (long|short|formal|informal|verbose|wordy)|shorter|concise|brief(er)?|"
              r"(more|less) (formal|casual|professional|friendly)|in (a )?(table|bullet|list)|bullet points|"
              r"tone|format (it|this)|in (english|spanish|french|german|chinese|korean|japanese))\b", None),
)
_COMPILED = [(c, re.compile(p, re.IGNORECASE), neg) for c, p, neg in RULES]
_NEG_RE = re.compile(_NEG + r"(\s+\w+){0,2}\s*$", re.IGNORECASE)  # a negator in the three words before a cue


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", str(text).lower()))


def rule_categories(user: str, max_chars: int = 400, previous_request: str | None = None) -> list[str]:
    """The SPUR categories lexical cues find in a user turn, in CATEGORIES order. Only the start and
    the end of a long turn are read (pasted code or text would otherwise raise every cue). No
    Engagement has no words of its own: it is a turn of three or more words that repeats
    `previous_request` (the user's turn before the reply), at least 90% of their words shared."""
    found = set()
    a, b = _words(user), _words(previous_request or "")
    if len(a) >= 3 and b and len(a & b) / len(a | b) >= 0.9:  # not "continue" after "continue"
        found.add("No Engagement")
    text = str(user)
    if len(text) > max_chars:
        text = text[: max_chars // 2] + "\n" + text[-max_chars // 2:]
    for cat, rx, negated in _COMPILED:
        for m in rx.finditer(text):
            if _NEG_RE.search(text[max(0, m.start() - 30):m.start()]):
                if negated:
                    found.add(negated)
            elif cat:
                found.add(cat)
    return [c for c in CATEGORIES if c in found]


# ----------------------------------------------------------------------------- the LLM judge
JUDGE_PROMPT = (
    "You label user satisfaction in a conversation with an AI assistant. Read the assistant's reply and the "
    "user's next message, then say which categories the user's message shows.\n\n"
    "Satisfaction (SAT) categories:\n{sat}\n\nDissatisfaction (DSAT) categories:\n{dsat}\n\n"
    "[Assistant reply]\n{assistant}\n\n[User's next message]\n{user}\n\n"
    "Answer with JSON only, listing category names exactly as written above (empty lists when none apply), "
    "for example {{\"sat\": [\"Gratitude\"], \"dsat\": [\"Style\"]}}.")


def clip(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n // 2] + " [...] " + text[-n // 2:]


def judge_messages(assistant: str, user: str, max_chars: int = 800) -> list[dict]:
    sat = "\n".join(f"- {k}: {v}" for k, v in SAT.items())
    dsat = "\n".join(f"- {k}: {v}" for k, v in DSAT.items())
    return [{"role": "user", "content": JUDGE_PROMPT.format(sat=sat, dsat=dsat, assistant=clip(assistant, max_chars),
                                                            user=clip(user, max_chars))}]


_CANON = {re.sub(r"[^a-z]", "", c.lower()): c for c in CATEGORIES}


def parse_judge(reply: str) -> list[str] | None:
    """The categories of a judge reply ({"sat": [...], "dsat": [...]} or a bare list of names), in
    CATEGORIES order; None when no such JSON is in the reply or it names no known category while
    claiming some (malformed output is counted by the caller, never guessed at)."""
    obj = first_json(reply)
    if isinstance(obj, dict):
        names = []
        for key in ("sat", "dsat", "SAT", "DSAT", "categories"):
            v = obj.get(key, [])
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list):
                return None
            names += [x for x in v if isinstance(x, str)]
        if not any(k in obj for k in ("sat", "dsat", "SAT", "DSAT", "categories")):
            return None
    elif isinstance(obj, list) and all(isinstance(x, str) for x in obj):
        names = obj
    else:
        return None
    found = {_CANON.get(re.sub(r"[^a-z]", "", n.lower())) for n in names}
    if names and found == {None}:
        return None
    return [c for c in CATEGORIES if c in found]


# ----------------------------------------------------------------------------- checklists
CHECKLIST_PROMPT = (
    "A user was not satisfied with an AI assistant's reply and said so in their next message. Write what the "
    "user wanted as a checklist of 1 to 4 short items that a better reply must meet (for example \"shorter\", "
    "\"use Python 3\", \"cite sources\").\n\n[User's request]\n{request}\n\n[Assistant reply]\n{assistant}\n\n"
    "[User's next message]\n{user}\n\nAnswer with a JSON list of strings only.")


def checklist_messages(request: str, assistant: str, user: str, max_chars: int = 800) -> list[dict]:
    return [{"role": "user", "content": CHECKLIST_PROMPT.format(request=clip(request, max_chars),
                                                                assistant=clip(assistant, max_chars),
                                                                user=clip(user, max_chars))}]


def parse_checklist(reply: str, max_items: int = 6, max_len: int = 200) -> list[str] | None:
    """Checklist items from a JSON list of strings (or {"checklist": [...]}), else from '-', '*' or
    '1.' bullet lines; None when neither is there."""
    obj = first_json(reply)
    if isinstance(obj, dict):
        obj = next((v for v in obj.values() if isinstance(v, list)), None)
    items = []
    if isinstance(obj, list):
        items = [str(x).strip() for x in obj if isinstance(x, str | int | float) and str(x).strip()]
    if not items:
        items = [m.group(1).strip() for m in re.finditer(r"(?m)^\s*(?:[-*•]|\d+[.)])\s+(.+?)\s*$", str(reply or ""))]
    items = [x[:max_len] for x in items if x][:max_items]
    return items or None


# ----------------------------------------------------------------------------- agreement
def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two labelings of the same items: (p_o - p_e) / (1 - p_e), p_o the observed
    agreement and p_e the agreement expected from the two marginals. 1.0 when both put every item in
    one and the same class (p_e = 1); None for no items."""
    if len(a) != len(b):
        raise ValueError("cohen_kappa: the two labelings differ in length")
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if pe == 1.0:
        return 1.0 if po == 1.0 else 0.0
    return (po - pe) / (1 - pe)


def agreement(a: Sequence[str], b: Sequence[str]) -> dict:
    """Polarity agreement of two labelings (None entries, e.g. unparsed judge replies, left out)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    k = cohen_kappa(xs, ys)
    return {"n": len(pairs), "left_out": len(a) - len(pairs), "kappa": None if k is None else round(k, 4),
            "accuracy": round(sum(x == y for x, y in pairs) / len(pairs), 4) if pairs else None,
            "confusion": {f"{x}>{y}": n for (x, y), n in sorted(Counter(pairs).items())}}


# ----------------------------------------------------------------------------- conversations
def context(messages: list[dict], end: int, keep: int, max_chars: int) -> list[dict]:
    """messages[:end] (ending on a user turn) cut to its last `keep` messages, starting on a user
    turn (a leading system turn kept), each clipped to max_chars."""
    msgs = messages[:end]
    system = [m for m in msgs[:1] if m["role"] == "system"]
    body = msgs[len(system):]
    if keep and len(body) > keep:
        body = body[-keep:]
    while body and body[0]["role"] != "user":
        body = body[1:]
    return [{"role": m["role"], "content": clip(m["content"], max_chars)} for m in system + body]


def render(messages: list[dict]) -> str:
    """A conversation as text, for the judge's [User request] block."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
