"""Deterministic, schema-valid stand-ins for what the LLM would answer.

The simulator needs answers that look like a real model's (so exports and demos are readable)
but cost nothing and never vary between runs: every choice comes from a ``random.Random`` seeded
with ``f"{seed}:{term}"`` (string seeds are hashed with SHA-512, unlike the salted ``hash()``).
All text is clipped to the limits of :mod:`flashcard_pipeline.models`, and the functions return
validated models, so a caller can never receive an answer the pipeline would reject.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Mapping

from flashcard_pipeline.models import (
    CardType,
    Comparison,
    Flashcard,
    FlashcardSet,
    Homonym,
    HonorificLevel,
    PartOfSpeech,
    TermAnalysis,
)

__all__ = ["analysis_for", "cards_for", "hangul_ipa", "hanja_homonyms", "part_of_speech"]

_SHORT, _MEDIUM, _LONG = 120, 400, 1200
#: How much of a long term or meaning is quoted inside generated prose.
_QUOTE = 40

_HANGUL_FIRST, _HANGUL_LAST = 0xAC00, 0xD7A3
_INITIALS = ("k", "k͈", "n", "t", "t͈", "ɾ", "m", "p", "p͈", "s", "s͈", "", "tɕ", "t͈ɕ", "tɕʰ", "kʰ", "tʰ", "pʰ", "h")
_MEDIALS = ("a", "ɛ", "ja", "jɛ", "ʌ", "e", "jʌ", "je", "o", "wa", "wɛ", "we", "jo", "u", "wʌ", "we", "wi", "ju",
            "ɯ", "ɰi", "i")
_FINALS = ("", "k̚", "k̚", "k̚", "n", "n", "n", "t̚", "l", "k̚", "m", "l", "l", "l", "p̚", "l", "m", "p̚", "p̚",
           "t̚", "t̚", "ŋ", "t̚", "t̚", "k̚", "t̚", "p̚", "t̚")

_POS_SYNONYMS: dict[str, PartOfSpeech] = {
    "n": PartOfSpeech.NOUN, "noun phrase": PartOfSpeech.NOUN, "bound noun": PartOfSpeech.NOUN,
    "dependent noun": PartOfSpeech.NOUN, "counter": PartOfSpeech.NOUN, "proper noun": PartOfSpeech.NOUN,
    "v": PartOfSpeech.VERB, "vb": PartOfSpeech.VERB, "action verb": PartOfSpeech.VERB,
    "auxiliary verb": PartOfSpeech.VERB, "descriptive verb": PartOfSpeech.ADJECTIVE,
    "adj": PartOfSpeech.ADJECTIVE, "adjectival": PartOfSpeech.ADJECTIVE,
    "adv": PartOfSpeech.ADVERB, "conjunction": PartOfSpeech.ADVERB, "conjunctive adverb": PartOfSpeech.ADVERB,
    "pron": PartOfSpeech.PRONOUN, "demonstrative": PartOfSpeech.PRONOUN,
    "postposition": PartOfSpeech.PARTICLE, "josa": PartOfSpeech.PARTICLE, "ending": PartOfSpeech.PARTICLE,
    "suffix": PartOfSpeech.PARTICLE, "marker": PartOfSpeech.PARTICLE,
    "det": PartOfSpeech.DETERMINER, "article": PartOfSpeech.DETERMINER, "prenoun": PartOfSpeech.DETERMINER,
    "num": PartOfSpeech.NUMERAL, "number": PartOfSpeech.NUMERAL, "numeric": PartOfSpeech.NUMERAL,
    "interj": PartOfSpeech.INTERJECTION, "exclamation": PartOfSpeech.INTERJECTION,
    "expression": PartOfSpeech.PHRASE, "idiom": PartOfSpeech.PHRASE, "collocation": PartOfSpeech.PHRASE,
}

#: Common Sino-Korean syllables and their Hanja; a tuple lists the readings a model would offer first.
_HANJA: dict[str, tuple[tuple[str, str], ...]] = {
    "학": (("學", "learning"),), "생": (("生", "life"),), "대": (("大", "big"), ("代", "generation")),
    "사": (("事", "matter"), ("社", "company"), ("四", "four")), "일": (("日", "day"), ("一", "one")),
    "인": (("人", "person"), ("因", "cause")), "국": (("國", "country"),),
    "시": (("時", "time"), ("市", "city"), ("詩", "poem")), "자": (("自", "self"), ("子", "child"), ("字", "letter")),
    "문": (("文", "writing"), ("門", "gate"), ("問", "question")),
    "전": (("電", "electricity"), ("前", "before"), ("全", "whole")),
    "정": (("正", "correct"), ("情", "feeling"), ("定", "fixed")),
    "성": (("成", "become"), ("性", "nature"), ("姓", "surname")), "고": (("高", "high"), ("古", "old")),
    "수": (("水", "water"), ("手", "hand"), ("數", "number")),
    "동": (("東", "east"), ("動", "move"), ("同", "same")), "실": (("室", "room"), ("實", "real")),
    "명": (("名", "name"), ("明", "bright")), "화": (("話", "speech"), ("火", "fire"), ("花", "flower")),
    "기": (("氣", "energy"), ("期", "period"), ("記", "record")),
    "가": (("家", "house"), ("歌", "song"), ("價", "price")), "공": (("工", "work"), ("公", "public"), ("空", "empty")),
    "교": (("校", "school"), ("敎", "teach")), "구": (("口", "mouth"), ("九", "nine")), "금": (("金", "gold"),),
    "년": (("年", "year"),), "도": (("道", "way"), ("度", "degree")), "력": (("力", "power"),),
    "리": (("理", "reason"), ("里", "village")), "목": (("目", "eye"), ("木", "tree")), "물": (("物", "thing"),),
    "민": (("民", "people"),), "방": (("方", "direction"), ("房", "room")), "부": (("父", "father"), ("部", "part")),
    "산": (("山", "mountain"),), "상": (("上", "above"), ("商", "trade")), "서": (("書", "book"), ("西", "west")),
    "선": (("先", "first"), ("線", "line")), "세": (("世", "world"),), "소": (("小", "small"), ("所", "place")),
    "식": (("食", "food"), ("式", "style")), "신": (("新", "new"), ("身", "body")), "심": (("心", "heart"),),
    "안": (("安", "peace"), ("案", "plan")), "어": (("語", "language"),), "외": (("外", "outside"),),
    "용": (("用", "use"),), "우": (("友", "friend"), ("雨", "rain")), "원": (("院", "institution"), ("元", "origin")),
    "월": (("月", "month"),), "유": (("有", "have"),), "의": (("意", "meaning"), ("醫", "medicine")),
    "장": (("長", "long"), ("場", "place")), "주": (("主", "master"), ("住", "dwell")),
    "중": (("中", "middle"), ("重", "heavy")), "지": (("地", "earth"), ("知", "know")),
    "차": (("車", "vehicle"), ("茶", "tea")), "천": (("天", "sky"), ("千", "thousand")), "체": (("體", "body"),),
    "통": (("通", "pass through"),), "한": (("韓", "Korea"), ("漢", "Han")), "행": (("行", "go"),),
    "회": (("會", "meeting"),), "후": (("後", "after"),), "관": (("關", "relation"), ("館", "building")),
    "경": (("京", "capital"), ("經", "pass")), "계": (("計", "plan"), ("界", "world")), "개": (("開", "open"),),
    "병": (("病", "illness"),), "간": (("間", "interval"),), "감": (("感", "feeling"),), "강": (("江", "river"),),
    "과": (("科", "subject"), ("過", "pass")), "남": (("男", "man"), ("南", "south")), "녀": (("女", "woman"),),
    "여": (("女", "woman"), ("旅", "travel")), "독": (("讀", "read"),), "면": (("面", "face"),),
    "무": (("無", "none"),), "미": (("美", "beauty"), ("未", "not yet")), "반": (("半", "half"),),
    "발": (("發", "emit"),), "백": (("白", "white"), ("百", "hundred")), "법": (("法", "law"),),
    "분": (("分", "part"),), "색": (("色", "colour"),), "업": (("業", "work"),), "역": (("驛", "station"),),
    "영": (("英", "English"), ("映", "reflect")), "음": (("音", "sound"), ("飮", "drink")),
    "입": (("入", "enter"),), "작": (("作", "make"),), "점": (("點", "point"), ("店", "shop")),
    "조": (("朝", "morning"),), "족": (("族", "family"),), "집": (("集", "gather"),), "책": (("冊", "book"),),
    "초": (("初", "beginning"),), "출": (("出", "go out"),), "친": (("親", "intimate"),), "특": (("特", "special"),),
    "표": (("表", "surface"), ("票", "ticket")), "품": (("品", "goods"),), "해": (("海", "sea"), ("害", "harm")),
    "현": (("現", "present"),), "형": (("兄", "elder brother"), ("形", "shape")), "활": (("活", "living"),),
    "휴": (("休", "rest"),), "제": (("題", "topic"), ("弟", "younger brother")),
}
_MAX_HANJA_SYLLABLES = 4
_PARTICLE_ENDINGS = frozenset("이가을를은는에의도로")

#: Words a Korean learner most often confuses with a term of each class.
_KOREAN_CONFUSABLES: dict[PartOfSpeech, tuple[str, ...]] = {
    PartOfSpeech.PRONOUN: ("나", "저", "제가", "우리", "그것", "이것"),
    PartOfSpeech.PARTICLE: ("은", "는", "이", "가", "을", "를", "에", "에서", "도", "만"),
    PartOfSpeech.VERB: ("하다", "되다", "가다", "오다", "있다", "보다"),
    PartOfSpeech.ADJECTIVE: ("좋다", "크다", "많다", "같다", "괜찮다"),
    PartOfSpeech.ADVERB: ("아주", "정말", "너무", "잘", "다시", "그냥"),
    PartOfSpeech.NOUN: ("것", "사람", "일", "때", "곳", "말"),
}
_CONTRASTS = ("is more formal and common in writing", "is more casual and mostly spoken",
              "is more emphatic", "is narrower in scope", "carries a more personal, emotional tone",
              "is preferred in fixed expressions")
_METAPHOR_NOUNS = ("lantern", "compass", "bridge", "key", "kite", "river", "drum", "mirror", "seed", "bell",
                   "staircase", "paper boat", "thread", "window", "clock")
_METAPHOR_ACTIONS = ("lights up", "points toward", "opens onto", "rings out with", "carries you to",
                     "unfolds into", "echoes", "pulls you toward", "reflects", "ties itself to")
_LOCATIONS = ("the kitchen table at home", "the front door of your flat", "a busy subway platform",
              "a corner convenience store", "a quiet library reading room", "a rooftop at sunset",
              "the school gate in the morning", "a riverside bench", "a crowded bus stop", "a small café window seat")
_ANCHORS = ("a red umbrella", "a brass bell", "a steaming cup of barley tea", "a folded paper crane",
            "a blue notebook", "a ceramic rice bowl", "a jingling set of keys", "a green glass bottle",
            "a worn leather glove", "a paper lantern")
_SENSES = ("the cool weight of {anchor} in your palm", "the faint smell of {anchor} in the air",
           "the sound {anchor} makes when it moves", "the bright colour of {anchor} catching your eye",
           "the rough texture of {anchor} under your fingertips")
_USAGE = ("Common in everyday conversation; {term} appears naturally when talking about '{meaning}'.",
          "Heard more in speech than in writing when people mean '{meaning}'.",
          "Typical in textbooks and news as the neutral way to express '{meaning}'.",
          "Used with friends and family; in formal settings a politer alternative is preferred.")
_GRAMMAR_NOTES: dict[PartOfSpeech, str] = {
    PartOfSpeech.NOUN: "it takes particles such as subject or object markers and can stand before 하다-verbs",
    PartOfSpeech.VERB: "it conjugates by attaching endings to its stem, which mark tense and politeness",
    PartOfSpeech.ADJECTIVE: "it conjugates like a verb and can modify a noun with a -(으)ㄴ ending",
    PartOfSpeech.ADVERB: "it sits before the verb or adjective it modifies and never takes case particles",
    PartOfSpeech.PARTICLE: "it attaches directly to the end of the word it marks, with no space",
    PartOfSpeech.PRONOUN: "it replaces a noun and takes the same particles a noun would",
    PartOfSpeech.DETERMINER: "it stands right before a noun and never changes form",
    PartOfSpeech.NUMERAL: "it combines with counters and can stand alone when counting",
    PartOfSpeech.INTERJECTION: "it stands alone, usually at the start of an utterance",
    PartOfSpeech.PHRASE: "it works as a fixed unit; change its parts and it loses the idiomatic sense",
}
_TOPIK_LEVELS = ("topik1", "topik2", "topik3", "topik4", "topik5", "topik6")
_CEFR_LEVELS = ("a1", "a2", "b1", "b2", "c1", "c2")
_KOREAN_NAMES = {"korean", "ko", "kor", "한국어"}


def _clip(text: str, limit: int) -> str:
    """Whitespace-normalised text that fits ``limit``, ellipsised instead of rejected."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "…"


def _slug(value: str) -> str:
    """A tag value: lower-case, no spaces or colons (the tag rule is ``key:value`` without spaces)."""
    slug = re.sub(r"[^\w.+-]+", "-", value.lower()).strip("-")
    return slug[:40] or "unknown"


def _is_hangul(char: str) -> bool:
    return _HANGUL_FIRST <= ord(char) <= _HANGUL_LAST


def _is_korean(term: str, language: str) -> bool:
    return language.strip().lower() in _KOREAN_NAMES or any(_is_hangul(c) for c in term)


def _hint(hints: Mapping[str, str], name: str) -> str | None:
    """A hint column by case-insensitive name; blank cells count as missing."""
    wanted = name.lower()
    for key, value in hints.items():
        if key.lower() == wanted and value is not None and str(value).strip():
            return str(value).strip()
    return None


def hangul_ipa(term: str) -> str:
    """Broad IPA for Hangul text, syllable by syllable (no sound-change rules), e.g. 내가 -> nɛ.ka.

    Each syllable is decomposed arithmetically into initial, medial and final jamo (Unicode
    lays them out as ``0xAC00 + (initial * 21 + medial) * 28 + final``). Other letters pass through
    lower-cased; whitespace separates words. Returns "" when there is nothing pronounceable.
    """
    words: list[str] = []
    for chunk in term.split():
        syllables: list[str] = []
        letters = ""
        for char in chunk:
            if _is_hangul(char):
                if letters:
                    syllables.append(letters)
                    letters = ""
                initial, rest = divmod(ord(char) - _HANGUL_FIRST, 21 * 28)
                medial, final = divmod(rest, 28)
                syllables.append(_INITIALS[initial] + _MEDIALS[medial] + _FINALS[final])
            elif char.isalnum():
                letters += char.lower()
        if letters:
            syllables.append(letters)
        if syllables:
            words.append(".".join(syllables))
    return " ".join(words)


def part_of_speech(type_: str | None) -> PartOfSpeech:
    """The pipeline's class for a loose input label; unknown labels default to noun like most vocabulary."""
    if not type_:
        return PartOfSpeech.NOUN
    label = " ".join(type_.strip().lower().replace("_", " ").split())
    try:
        return PartOfSpeech(label)
    except ValueError:
        return _POS_SYNONYMS.get(label, _POS_SYNONYMS.get(label.rstrip("."), PartOfSpeech.NOUN))


def hanja_homonyms(term: str, pos: PartOfSpeech, rng: random.Random) -> list[Homonym]:
    """1-2 Hanja readings when every syllable of a short Korean noun is a common Sino-Korean one."""
    syllables = term.strip()
    if len(syllables) >= 3 and syllables[-1] in _PARTICLE_ENDINGS:
        syllables = syllables[:-1]  # 문제가 is 문제 + subject particle: only the noun has Hanja
    if pos is not PartOfSpeech.NOUN or not 1 <= len(syllables) <= _MAX_HANJA_SYLLABLES:
        return []
    if not all(s in _HANJA for s in syllables):
        return []
    combos = list(itertools.product(*(_HANJA[s] for s in syllables)))
    chosen = [combos[0]]
    if len(combos) > 1 and rng.random() < 0.6:
        chosen.append(rng.choice(combos[1:]))
    homonyms = []
    for combo in chosen:
        hanja = "".join(h for h, _ in combo)
        gloss = " + ".join(g for _, g in combo)
        homonyms.append(Homonym(
            hanja=hanja,
            reading=syllables,
            meaning=_clip(gloss, _SHORT),
            differentiator=_clip(f"Written {hanja} ({gloss}); the characters, not the sound, tell this "
                                 f"{syllables} apart from other words read the same way.", _MEDIUM),
        ))
    return homonyms


def _ipa(term: str, hints: Mapping[str, str], korean: bool) -> str:
    given = _hint(hints, "IPA_Pronunciation") or _hint(hints, "IPA")
    if given:
        return _clip(given, _SHORT)
    ipa = hangul_ipa(term) if korean else ""
    return _clip(ipa, _SHORT) if ipa else f"/{_clip(term.lower(), _SHORT - 2)}/"


def analysis_for(
    term: str,
    *,
    type: str | None = None,
    language: str = "Korean",
    learner_language: str = "English",
    hints: Mapping[str, str] | None = None,
    seed: int = 0,
) -> TermAnalysis:
    """A plausible stage-1 answer for ``term``; the same arguments always give the same analysis."""
    term = term.strip()
    if not term:
        raise ValueError("term must not be blank")
    hints = hints or {}
    rng = random.Random(f"{seed}:{term}")
    korean = _is_korean(term, language)
    pos = part_of_speech(type or _hint(hints, "Word_Type"))
    quoted = _clip(term, _QUOTE)
    definition = _hint(hints, "Definition")
    meaning = _clip(definition or f"{quoted} (core sense)", _SHORT)
    short_meaning = _clip(meaning, _QUOTE)

    noun = rng.choice(_METAPHOR_NOUNS)
    action = rng.choice(_METAPHOR_ACTIONS)
    location = rng.choice(_LOCATIONS)
    anchor = rng.choice(_ANCHORS)
    sensory = rng.choice(_SENSES).format(anchor=anchor)

    example = _hint(hints, "Example_Sentence")
    translation = _hint(hints, "Example_Sentence_Translation")
    explanation_parts = [
        f"{quoted} is a {pos.value} meaning '{short_meaning}'.",
        f"Picture {_a(noun)} that {action} '{short_meaning}' at {location}.",
    ]
    if example:
        explanation_parts.append(f"Example: {_clip(example, 200)}" + (f" ({_clip(translation, 200)})"
                                                                       if translation else ""))
    explanation_parts.append(f"Learners of {language} usually meet it early; say it aloud while "
                             f"holding the image of {anchor}.")

    usage_hint = _hint(hints, "Usage_Hint")
    usage_context = None
    if usage_hint or rng.random() < 0.6:
        usage_context = _clip(usage_hint or rng.choice(_USAGE).format(term=quoted, meaning=short_meaning),
                              _MEDIUM)

    comparison = None
    if rng.random() < 0.5:
        pool = tuple(w for w in _KOREAN_CONFUSABLES.get(pos, ()) if w != term) if korean else ()
        vs = rng.choice(pool) if pool else f"a near-synonym of '{_clip(meaning, 60)}'"
        comparison = Comparison(
            vs=_clip(vs, _SHORT),
            nuance=_clip(f"{quoted} is the everyday choice for '{short_meaning}', while {vs} "
                         f"{rng.choice(_CONTRASTS)}.", _MEDIUM),
        )

    keywords = _keywords(definition or "", pos, noun, location, rng)
    return TermAnalysis(
        term=term,
        ipa=_ipa(term, hints, korean),
        pos=pos,
        primary_meaning=meaning,
        other_meanings="",
        metaphor=_clip(f"{quoted} is {_a(noun)} that {action} '{short_meaning}' at {location}.", _MEDIUM),
        metaphor_noun=noun,
        metaphor_action=action,
        suggested_location=location,
        anchor_object=anchor,
        anchor_sensory=_clip(f"Notice {sensory} whenever you say {quoted}.", _MEDIUM),
        explanation=_clip(" ".join(explanation_parts), _LONG),
        usage_context=usage_context,
        comparison=comparison,
        homonyms=hanja_homonyms(term, pos, rng) if korean else [],
        keywords=keywords,
    )


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _keywords(meaning: str, pos: PartOfSpeech, noun: str, location: str, rng: random.Random) -> list[str]:
    """3-6 distinct short search words drawn from the meaning and the memory image."""
    words = [w for w in re.split(r"[\s,;/()]+", meaning.lower()) if len(w) > 2]
    candidates = [*words[:3], pos.value, noun, location.split()[-1], "vocabulary", "flashcard"]
    unique = list(dict.fromkeys(_clip(c, _SHORT) for c in candidates if c))
    return unique[: rng.randint(3, min(6, len(unique)))]


def cards_for(
    term: str,
    analysis: TermAnalysis,
    *,
    language: str = "Korean",
    learner_language: str = "English",
    seed: int = 0,
    hints: Mapping[str, str] | None = None,
) -> FlashcardSet:
    """A plausible stage-2 answer: 2-4 cards, with a Hanja card only when the analysis has homonyms; the
    level tag follows the input's TOPIK_Level column when it has one."""
    term = term.strip() or analysis.term
    rng = random.Random(f"{seed}:{term}:cards")
    korean = _is_korean(term, language)
    quoted = _clip(term, _QUOTE)
    meaning = _clip(analysis.primary_meaning, 80)

    optional: list[CardType] = [CardType.EXAMPLE, CardType.GRAMMAR, CardType.CULTURAL]
    if korean:
        optional.append(CardType.FORMAL_CASUAL)
    if analysis.comparison is not None:
        optional.append(CardType.USAGE_COMPARISON)
    required = [CardType.SCENE] + ([CardType.HANJA] if analysis.homonyms else [])
    count = rng.randint(2, 4)
    types = required + rng.sample(optional, max(0, count - len(required)))

    given = _hint(hints or {}, "TOPIK_Level")
    level = rng.choice(_TOPIK_LEVELS if korean else _CEFR_LEVELS)
    if given and f"topik{given}" in _TOPIK_LEVELS:
        level = f"topik{given}"
    base_tags = [f"pos:{analysis.pos.value}", f"lang:{_slug(language)}", f"level:{level}"]
    cards = []
    for card_type in types:
        front, back = _card_text(card_type, quoted, meaning, analysis, learner_language)
        if card_type is CardType.FORMAL_CASUAL:
            honorific = rng.choice((HonorificLevel.FORMAL, HonorificLevel.CASUAL))
        elif korean:
            honorific = rng.choice((HonorificLevel.NEUTRAL, HonorificLevel.NONE))
        else:
            honorific = HonorificLevel.NONE
        cards.append(Flashcard(
            card_type=card_type,
            front=_clip(front, _LONG),
            back=_clip(back, _LONG),
            tags=[*base_tags, f"card:{_slug(card_type.value)}"],
            honorific_level=honorific,
        ))
    return FlashcardSet(cards=cards)


def _card_text(card_type: CardType, term: str, meaning: str, analysis: TermAnalysis,
               learner_language: str) -> tuple[str, str]:
    answer = f"{term} [{_clip(analysis.ipa, 60)}] — {meaning}"
    if card_type is CardType.SCENE:
        return (f"At {analysis.suggested_location}, {analysis.anchor_object}: {_a(analysis.metaphor_noun)} "
                f"that {analysis.metaphor_action} '{meaning}'. Which word is it?", answer)
    if card_type is CardType.HANJA:
        first = analysis.homonyms[0]
        return (f"Which Hanja are behind {term} (meaning '{meaning}')?",
                f"{first.hanja} — {first.meaning}. {term} means '{meaning}'.")
    if card_type is CardType.USAGE_COMPARISON and analysis.comparison is not None:
        return (f"{term} or {analysis.comparison.vs}: which one means '{meaning}' here?",
                f"{term}. {analysis.comparison.nuance}")
    if card_type is CardType.GRAMMAR:
        return (f"How does the {analysis.pos.value} {term} fit into a sentence?",
                f"{term} ({meaning}): {_GRAMMAR_NOTES[analysis.pos]}.")
    if card_type is CardType.FORMAL_CASUAL:
        return (f"Is {term} ('{meaning}') polite enough for a job interview?",
                f"{term} means '{meaning}'. Match the verb ending to the listener: -습니다 when formal, "
                f"-아/어 with close friends.")
    if card_type is CardType.CULTURAL:
        context = analysis.usage_context or f"everyday situations where '{meaning}' comes up."
        return (f"When would a native speaker say {term}?", f"{term} ('{meaning}'): {context}")
    return (f"Fill the gap with the word for '{meaning}': ___ (think of {analysis.anchor_object}).",
            f"{answer}. {analysis.metaphor}")
