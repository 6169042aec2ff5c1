"""The facts of a question: what in a prompt changes its answer, reduced to comparable sets.

Sentence embeddings place "capital of France" next to "capital of Germany" and "2023"
next to "2024": measured here, hard negatives are on average *more* similar to the cached
question than true paraphrases are. :func:`extract_facts` reduces a prompt to the few
things that change an answer, and the second stage (:mod:`._verifier`) compares them:

* numbers (digits, number words, ordinals, percentages, amounts);
* dates and times (weekdays, months, today / tomorrow / last week ...);
* negation (not, never, without, no ... counted) and polarity pairs (enable / disable,
  increase / decrease, before / after, pros / cons ...);
* superlatives (largest / smallest, cheapest / fastest);
* named entities (capitalised words inside a sentence, acronyms, quoted text, a list of
  countries, languages and tools written in lower case);
* content words in order, to catch numbers bound to other words ("option 1 is X").

The word lists here are closed classes of the language (numbers, weekdays, negations,
polar pairs) and a list of names people write in lower case; the verifier's own word
relations come from WordNet (:mod:`._text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Facts", "extract_facts"]

_WORD = re.compile(r"[a-z]+n't|[a-z0-9]+(?:[.,][0-9]+)*%?")
_RAW_TOKEN = re.compile(r"\"[^\"]{1,60}\"|'[^'\s][^']{0,58}'(?![a-z])|[\w$£€%.,'-]+")

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16",
    "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30",
    "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
    "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1e6", "billion": "1e9",
    "dozen": "12", "half": "0.5", "quarter": "0.25", "double": "x2", "twice": "x2",
    "triple": "x3", "single": "1",
    "first": "#1", "second": "#2", "third": "#3", "fourth": "#4", "fifth": "#5",
    "sixth": "#6", "seventh": "#7", "eighth": "#8", "ninth": "#9", "tenth": "#10",
    "last": "#last", "next": "#next", "previous": "#prev",
}
_ORDINAL = re.compile(r"^(\d+)(st|nd|rd|th)$")

_TIME_WORDS = frozenset(
    "monday tuesday wednesday thursday friday saturday sunday weekend weekday weekdays "
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec "
    "today tonight tomorrow yesterday now morning afternoon evening night noon midnight "
    "week month year decade century hour minute daily weekly monthly yearly annual annually "
    "hourly spring summer autumn fall winter this".split())

_MONTH_ABBREVIATIONS = {
    "jan": "january", "feb": "february", "mar": "march", "apr": "april", "jun": "june",
    "jul": "july", "aug": "august", "sep": "september", "sept": "september",
    "oct": "october", "nov": "november", "dec": "december"}

_NEGATIONS = frozenset("not no never without none nobody nothing neither nor cannot "
                       "nowhere hardly".split())

# word -> (axis, pole). Words on the same axis with different poles flip the meaning.
_POLES: dict[str, tuple[str, int]] = {}
for _axis, _plus, _minus in (
    ("enable", "enable enabled enabling activate turn_on switch_on allow unblock unmute",
     "disable disabled disabling deactivate turn_off switch_off block forbid mute"),
    ("size", "increase raise grow expand enlarge bigger larger more higher up zoom_in",
     "decrease reduce lower shrink smaller less fewer down zoom_out"),
    ("extreme", "maximum max highest largest biggest most longest tallest oldest best top",
     "minimum min lowest smallest fewest least shortest youngest newest worst bottom"),
    ("good", "advantage advantages pro pros benefit benefits upside good positive",
     "disadvantage disadvantages con cons drawback drawbacks downside bad negative"),
    ("time", "before prior earlier start begin beginning open opening",
     "after later afterwards end finish ending close closing"),
    ("membership", "add insert include join subscribe follow attach",
     "remove delete exclude leave unsubscribe unfollow detach"),
    ("direction", "import upload send push give lend buy deposit in into to",
     "export download receive pull take borrow sell withdraw out from"),
    ("speed", "fast fastest quick quickest", "slow slowest"),
    ("price", "cheap cheapest cheaper inexpensive", "expensive priciest dearer costly"),
    ("state", "lock locked encrypt encrypted compress zip mount connect login log_in "
     "sign_in on", "unlock unlocked decrypt decrypted decompress unzip unmount disconnect "
     "logout log_out sign_out off"),
    ("truth", "true correct right valid safe legal", "false incorrect wrong invalid "
     "unsafe illegal"),
    ("temperature", "hot warm warmest hottest heat", "cold cool coldest coolest"),
    ("age", "old older", "new newer young younger"),
    ("acceptance", "accept approve agree", "reject decline deny disagree"),
    ("win", "win won winner gain profit", "lose lost loser loss"),
):
    for _word in _plus.split():
        _POLES[_word] = (_axis, 1)
    for _word in _minus.split():
        _POLES[_word] = (_axis, -1)
_PHRASES = re.compile(r"\b(turn|switch|zoom|log|sign) (on|off|in|out)\b")
_NON_POLAR_IN_PHRASE = frozenset({"in", "out", "on", "off", "to", "into", "from", "up",
                                  "down"})  # polar only inside the phrases above

_SUPERLATIVE_SYNONYMS = {"tallest": "highest", "biggest": "largest", "nearest": "closest",
                         "tiniest": "smallest", "quickest": "fastest"}
_NOT_SUPERLATIVES = frozenset(
    "interest request latest test forest honest suggest guest west nest chest rest contest "
    "protest digest harvest invest manifest modest priest quest arrest pest vest".split())
_SUPERLATIVES = frozenset("best worst most least".split())

# Words that name the same thing, so swapping one for another is not a different question.
_SYNONYM_GROUPS = (
    "write wrote written author compose composed", "tallest highest", "biggest largest",
    "closest nearest", "smallest tiniest", "update change modify edit alter",
    "summarize summarise summary", "check see find view", "say translate", "distance far",
    "convert turn transform", "fix repair", "buy purchase", "begin start", "big large",
    "small little tiny", "show display", "create make build", "error bug issue problem",
    "car automobile", "kid child", "cost price", "movie film", "dict dictionary",
    "app application", "photo picture image", "ocean sea", "job work", "quickly fast",
)
_SYNONYMS = {word: group.split()[0] for group in _SYNONYM_GROUPS for word in group.split()}

_STOPWORDS = frozenset(
    "a an the of in on at to for from by with about as into onto over under and or but if "
    "then so than too very is are was were be been being am do does did doing done have has "
    "had having i me my mine we us our you your yours he him his she her it its they them "
    "their this that these those there here what which who whom whose when where why how "
    "whats what's how's can could would should will shall may might must please tell show "
    "explain give me let know want need like get got make way ways some any all each every "
    "much many just also really actually kind sort type one thing things something "
    "anything use using used s its it's i'm i'd you're don't does't cant can't "
    "difference between meaning mean means called name define definition describe "
    "help question answer quick simple example examples".split())

_ENTITY_WORDS = frozenset(
    # countries, regions and big cities people write in lower case
    "france germany spain italy portugal uk britain england scotland wales ireland usa "
    "america canada mexico brazil argentina chile peru colombia china japan korea india "
    "pakistan russia ukraine poland sweden norway denmark finland iceland netherlands "
    "belgium switzerland austria greece turkey egypt nigeria kenya africa europe asia "
    "australia zealand london paris berlin madrid rome tokyo osaka beijing shanghai delhi "
    "mumbai moscow dubai chicago york boston sydney toronto "
    # languages and programming languages, tools
    "english spanish french german italian portuguese chinese mandarin japanese korean "
    "hindi arabic russian dutch polish turkish greek latin python java javascript "
    "typescript rust golang ruby php perl swift kotlin scala haskell sql bash "
    "powershell html css react vue angular django flask rails node numpy pandas docker "
    "kubernetes linux windows macos ios android ubuntu debian excel git github "
    "aws azure gcp s3 postgres postgresql mysql sqlite mongodb redis".split())


@dataclass(frozen=True)
class Facts:
    """What in a prompt changes the answer, reduced to comparable sets."""

    numbers: frozenset[str]
    times: frozenset[str]
    negations: int
    poles: frozenset[tuple[str, int]]
    superlatives: frozenset[str]
    entities: frozenset[str]
    content: frozenset[str]
    #: (word before, word after) around "to", "into", "than", "vs": "euros to dollars"
    directions: frozenset[tuple[str, str]] = frozenset()
    #: content words in order, to catch the same words rearranged ("option 1 is X,
    #: option 2 is Y" / "option 1 is Y, option 2 is X")
    sequence: tuple[str, ...] = ()


def _stem(word: str) -> str:
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed") and not word.endswith("eed"):
        return word[:-2]
    if len(word) > 5 and word.endswith("ly"):
        return word[:-2]
    return word


def _number(token: str) -> str | None:
    cleaned = token.strip("$£€").rstrip(".,")
    match = _ORDINAL.match(cleaned)
    if match:
        return "#" + match.group(1)
    percent = cleaned.endswith("%")
    digits = cleaned.rstrip("%").replace(",", "")
    try:
        value = float(digits)
    except ValueError:
        return _NUMBER_WORDS.get(cleaned)
    text = f"{value:g}"
    return text + ("%" if percent else "")


def _entities(raw: str) -> set[str]:
    """Capitalised words not at a sentence start, acronyms, quoted text, known names."""
    found: set[str] = set()
    sentence_start = True
    for token in _RAW_TOKEN.findall(raw):
        if token[0] in "'\"" and token[-1] == token[0] and len(token) > 2:
            found.add("q:" + token[1:-1].casefold().strip())
            sentence_start = False
            continue
        word = token.strip(".,;:!?'\"()")
        if not word:
            continue
        letters = [ch for ch in word if ch.isalpha()]
        if letters and word != "I":
            upper_inside = any(ch.isupper() for ch in word[1:])
            if (word[0].isupper() and not sentence_start) or upper_inside:
                found.add(_stem(word.casefold()))
        sentence_start = token.endswith((".", "?", "!", ":"))
    return found


@lru_cache(maxsize=4096)
def extract_facts(text: str) -> Facts:
    """Reduce ``text`` to the facts :func:`facts_conflict` compares."""
    lowered = text.casefold().replace("’", "'")
    lowered = _PHRASES.sub(lambda m: f"{m.group(1)}_{m.group(2)}", lowered)
    numbers: set[str] = set()
    times: set[str] = set()
    poles: set[tuple[str, int]] = set()
    superlatives: set[str] = set()
    content: set[str] = set()
    sequence: list[str] = []
    negations = 0
    words = _WORD.findall(lowered) + re.findall(r"\b\w+_(?:on|off|in|out)\b", lowered)
    previous = ""
    for word in words:
        if word.endswith("n't") or word in _NEGATIONS:
            negations += 1
            previous = word
            continue
        number = _number(word)
        if number is not None and not (word in ("one", "single") and previous in ("a", "")):
            if not (number.startswith("#") and word in ("last", "next", "previous")
                    and not _is_time_follow(lowered, word)):
                numbers.add(number)
        if word in _TIME_WORDS or _ORDINAL.match(word):
            times.add(_MONTH_ABBREVIATIONS.get(word, word))
        pole = _POLES.get(word)
        if pole is not None and word not in _NON_POLAR_IN_PHRASE:
            poles.add(pole)
        if word in _SUPERLATIVES or (word.endswith("est") and len(word) > 5
                                     and word not in _NOT_SUPERLATIVES):
            superlatives.add(_SUPERLATIVE_SYNONYMS.get(word, word))
        if word not in _STOPWORDS and (len(word) > 1 or word.isdigit()):
            sequence.append(_stem(word))
            if not word.isdigit():
                content.add(_stem(word))
        previous = word
    for phrase in re.findall(r"\b\w+_(?:on|off|in|out)\b", lowered):
        pole = _POLES.get(phrase)
        if pole is not None:
            poles.add(pole)
    if "this" in times and not re.search(r"\bthis (week|month|year|weekend|morning|"
                                         r"afternoon|evening|summer|winter|spring|autumn)",
                                         lowered):
        times.discard("this")
    directions = _directions(words)
    entities = _entities(text)
    entities |= {_stem(word) for word in words if word in _ENTITY_WORDS}
    return Facts(numbers=frozenset(numbers), times=frozenset(times), negations=negations,
                 poles=frozenset(poles), superlatives=frozenset(superlatives),
                 entities=frozenset(entities), content=frozenset(content),
                 directions=directions, sequence=tuple(sequence))


_DIRECTIONAL = frozenset({"to", "into", "than", "vs", "versus"})


def _directions(words: list[str]) -> frozenset[tuple[str, str]]:
    pairs = set()
    for index, word in enumerate(words):
        if word not in _DIRECTIONAL:
            continue
        before = next((_stem(w) for w in reversed(words[:index]) if w not in _STOPWORDS), None)
        after = next((_stem(w) for w in words[index + 1:] if w not in _STOPWORDS), None)
        if before and after:
            pairs.add((before, after))
    return frozenset(pairs)


def _is_time_follow(lowered: str, word: str) -> bool:
    return re.search(rf"\b{word} (week|month|year|weekend|night|time|day|quarter)",
                     lowered) is not None


def _bindings(sequence: tuple[str, ...]) -> set[tuple[str, str]]:
    """(number, the content word after it): "option 1 is upgrading" -> ("1", "upgrad")."""
    pairs = set()
    for index, word in enumerate(sequence[:-1]):
        if word[0].isdigit():
            follower = sequence[index + 1]
            if not follower[0].isdigit():
                pairs.add((word, follower))
    return pairs


def _rebound(a: Facts, b: Facts) -> bool:
    """The same numbers and words on both sides, attached to each other differently."""
    pairs_b = _bindings(b.sequence)
    numbers_b = {word for word in b.sequence if word[0].isdigit()}
    for number, word in _bindings(a.sequence):
        if number in numbers_b and word in b.content and (number, word) not in pairs_b:
            return True
    return False
