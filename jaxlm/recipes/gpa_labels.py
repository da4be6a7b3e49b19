"""GPA's per-conversation labels and preference statements: the rule labeller (group and intent), the
rule extractor of preference statements, the judge prompts and their parsers, and the normalisation of
statements into a vocabulary of items. Pure functions (no files, no requests).

Rules (unit-tested on crafted conversations):
  group   developer when the user's turns hold code (a ``` fence, a Python traceback, or at least two
          code-like lines: def/class/import/#include/SELECT..., a call ending in { ; or :), else general
  intent  the first user turn's wording, first match wins: coding (code in the turns or programming
          words), writing (write/essay/email/rewrite/...), advice (should I/recommend/tips/...),
          explanation (everything else)
"""

from __future__ import annotations

import re
from collections import Counter

from jaxlm.recipes.common import first_json

RULE_GROUPS = ("developer", "general")
RULE_INTENTS = ("coding", "writing", "explanation", "advice")

_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |#include|public |private |static |function |const |let |var |"
    r"return |for \(|while \(|if \(|select .+ from|insert into|create table|<\?php|<[a-z]+[^>]*>|\$ \w|"
    r"console\.log|print\(|System\.out)|[\w\].)]\([^()]*\)\s*[{;:]\s*$|;\s*$|^\s*[}{]\s*$",
    re.IGNORECASE)
_WORDS = {
    "coding": r"code|coding|program|programming|function|python|javascript|typescript|java|c\+\+|c#|sql|script|"
              r"bug|debug|compile|compiler|api|regex|html|css|react|database|algorithm|implement|git|docker|"
              r"kubernetes|linux|bash|json|class|method|variable|node\.?js|django|flask|excel formula",
    "writing": r"write|writing|essay|poem|story|letter|email|e-mail|blog|article|rewrite|rephrase|paraphrase|"
               r"draft|lyrics|caption|tweet|speech|slogan|outline|cover letter|proofread|summari[sz]e",
    "advice": r"should i|advice|advise|recommend|recommendation|suggest|suggestions|tips|what should|"
              r"help me decide|best way|plan for|strategy|how can i improve|is it better",
}
_INTENT_RE = {k: re.compile(rf"\b(?:{v})\b", re.IGNORECASE) for k, v in _WORDS.items()}


def user_turns(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m.get("role") == "user"]


def has_code(text: str) -> bool:
    if "```" in text or "Traceback (most recent call last)" in text:
        return True
    return sum(bool(_CODE_LINE.search(line)) for line in text.splitlines() if line.strip()) >= 2


def rule_group(messages: list[dict]) -> str:
    return "developer" if any(has_code(t) for t in user_turns(messages)) else "general"


def rule_intent(messages: list[dict]) -> str:
    turns = user_turns(messages)
    first = turns[0] if turns else ""
    if has_code(first) or _INTENT_RE["coding"].search(first):
        return "coding"
    for intent in ("writing", "advice"):
        if _INTENT_RE[intent].search(first):
            return intent
    return "explanation"


# (pattern over the user's turns, statement); a fenced block in a user turn adds SHARES_CODE
_PREFERENCE_RULES = [
    (r"step[- ]by[- ]step", "wants step-by-step instructions"),
    (r"examples?|e\.g\.|for instance", "wants examples"),
    (r"short|shorter|brief|briefly|concise|in one sentence|tl;?dr", "prefers concise replies"),
    (r"more detail|in detail|detailed|elaborate|expand on|longer|in depth", "wants more detail"),
    (r"bullet|bullets|bullet points|a list|numbered list", "wants lists or bullet points"),
    (r"table", "wants a table"),
    (r"simple terms|simply|beginner|layman|eli5|easy to understand|like i'?m five", "wants simple language"),
    (r"formal|professional", "wants a formal tone"),
    (r"casual|friendly|funny|humou?r|witty", "wants a casual or humorous tone"),
    (r"continue", "wants long replies continued"),
    (r"rewrite|rephrase|paraphrase|improve|proofread|polish", "wants its own text rewritten or improved"),
    (r"comments?|explain (?:the|this) code", "wants commented or explained code"),
    (r"error|bug|fix|doesn'?t work|does not work|not working|debug|exception", "wants debugging help"),
    (r"python|javascript|typescript|java|c\+\+|c#|sql|rust|golang|php|ruby|bash|kotlin|swift",
     "wants code in a specific language"),
    (r"code|function|script|program|implement", "wants working code"),
    (r"wrong|incorrect|mistake|not what i|that'?s not", "wants corrections when the reply is wrong"),
    (r"why|reason|reasons", "wants reasons and explanations"),
    (r"sources?|references?|cite|citations?", "wants sources"),
    (r"\d+ words|word count|paragraphs?|sentences", "wants a specific length or structure"),
]
_PREFERENCE_RE = [(re.compile(rf"\b(?:{p})\b", re.IGNORECASE), s) for p, s in _PREFERENCE_RULES]
SHARES_CODE = "shares code and wants it worked on"


def rule_preferences(messages: list[dict]) -> list[str]:
    """Preference statements the wording of the user's turns implies, in the table's order."""
    text = "\n".join(user_turns(messages))
    out = [SHARES_CODE] if "```" in text else []
    out += [s for rx, s in _PREFERENCE_RE if rx.search(text)]
    return out


# ----------------------------------------------------------------------------- judge prompts
def render(messages: list[dict], max_chars: int, max_total: int = 0) -> str:
    """The conversation as text for a judge: user turns up to max_chars, assistant turns to a third;
    turns stop once max_total characters are used (0 = all turns; the first turn always shows)."""
    out, used = [], 0
    for m in messages:
        limit = max_chars if m["role"] == "user" else max(1, max_chars // 3)
        text = m["content"] if len(m["content"]) <= limit else m["content"][:limit] + " [...]"
        if out and max_total and used + len(text) > max_total:
            out.append("[... later turns left out]")
            break
        used += len(text)
        out.append(f"[{m['role'].capitalize()}]\n{text}")
    return "\n\n".join(out)


LABEL_PROMPT = (
    "Classify the user of this conversation with an AI assistant.\n\n{conversation}\n\n"
    "Group, one of: {groups}.\nIntent of the user's first request, one of: {intents}.\n"
    "Answer with JSON only, for example {{\"group\": \"{g0}\", \"intent\": \"{i0}\"}}.")
EXTRACT_PROMPT = (
    "Read this conversation between a user and an AI assistant.\n\n{conversation}\n\n"
    "List the user's implicit preferences about how the assistant should reply (format, length, level of "
    "detail, tone, code, examples, ...), as short statements such as \"prefers runnable code\" or "
    "\"wants bullet points\". Answer with a JSON list of at most {k} strings.")
CANON_PROMPT = (
    "Rewrite this preference of a user as a short, general phrase that starts with \"prefers\" or \"wants\" "
    "(at most 8 words). Answer with the phrase only.\n\nPreference: {statement}")


def _one_of(text: str, names) -> str | None:
    found = [n for n in names if re.search(rf"\b{re.escape(n)}\b", text, re.IGNORECASE)]
    return found[0] if len(found) == 1 else None


def parse_label(reply: str, groups, intents) -> tuple[str | None, str | None]:
    """(group, intent) from {"group", "intent"} JSON, else from the one name of each the reply holds."""
    obj = first_json(reply)
    g = i = None
    if isinstance(obj, dict):
        g = str(obj.get("group", "")).strip().lower()
        i = str(obj.get("intent", "")).strip().lower()
        g = g if g in groups else None
        i = i if i in intents else None
    text = str(reply or "")
    return g or _one_of(text, groups), i or _one_of(text, intents)


def parse_statements(reply: str, max_items: int, max_len: int = 120) -> list[str] | None:
    """Statements from a JSON list of strings (or an object holding one), else from '-', '*' or '1.'
    lines; None when neither is there."""
    obj = first_json(reply)
    if isinstance(obj, dict):
        obj = next((v for v in obj.values() if isinstance(v, list)), None)
    items: list[str] = []
    if isinstance(obj, list):
        items = [str(x).strip() for x in obj if isinstance(x, str) and str(x).strip()]
    if not items:
        items = [m.group(1).strip() for m in re.finditer(r"(?m)^\s*(?:[-*•]|\d+[.)])\s+(.+?)\s*$", str(reply or ""))]
    items = [x[:max_len] for x in items if x][:max_items]
    return items or None


def parse_canonical(reply: str, max_words: int = 12) -> str | None:
    line = next((x.strip() for x in str(reply or "").splitlines() if x.strip()), "")
    line = line.strip("\"'`*.- ").split(":", 1)[-1].strip("\"'` ") if line else ""
    return line if line and len(line.split()) <= max_words else None


# ----------------------------------------------------------------------------- normalisation
_LEAD = re.compile(r"^(?:the user |user |they |he |she )", re.IGNORECASE)


def canonical(text: str) -> str:
    """Lower case, one space, no surrounding quotes or final punctuation, no leading 'the user'."""
    t = " ".join(str(text).lower().split()).strip("\"'`*-•. ;:,")
    return _LEAD.sub("", t).strip()


def cluster(statements: Counter, threshold: float) -> dict[str, str]:
    """{statement: representative}: statements (most frequent first, ties by text) join the first
    representative whose TF-IDF (character 3-5-grams within words) cosine similarity reaches
    `threshold`, else become a representative themselves. scikit-learn's TfidfVectorizer."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    order = sorted(statements, key=lambda s: (-statements[s], s))
    if not order:
        return {}
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True).fit(order)
    x = vec.transform(order)  # rows are L2-normalised: x @ x.T is the cosine
    reps: list[int] = []
    out = {}
    for k, s in enumerate(order):
        best, best_sim = None, threshold
        if reps:
            sims = (x[reps] @ x[k].T).toarray().ravel()
            j = int(sims.argmax())
            if sims[j] >= best_sim:
                best = reps[j]
        if best is None:
            reps.append(k)
            best = k
        out[s] = order[best]
    return out
