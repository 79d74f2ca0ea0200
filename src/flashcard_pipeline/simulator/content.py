"""Deterministic, schema-valid stand-ins for what the LLM would answer.

The simulator needs answers that look like a real model's (so exports and demos are readable)
but cost nothing and never vary between runs: every choice comes from a ``random.Random`` seeded
with ``f"{seed}:{term}"`` (string seeds are hashed with SHA-512, unlike the salted ``hash()``).
All text is clipped to the limits of :mod:`flashcard_pipeline.models`, and the functions return
validated models, so a caller can never receive an answer the pipeline would reject.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import struct
from collections.abc import Mapping

from flashcard_pipeline.export.audio import encode_mp3
from flashcard_pipeline.korean.analyzer import head_candidates, join, locate
from flashcard_pipeline.korean.pronunciation import pronounce
from flashcard_pipeline.models import (
    CardType,
    Comparison,
    ExampleSentence,
    Flashcard,
    FlashcardSet,
    Form,
    HanjaCharacter,
    HanjaSpelling,
    Homonym,
    HonorificLevel,
    PartOfSpeech,
    TermAnalysis,
)

__all__ = ["analysis_for", "cards_for", "hangul_ipa", "hanja_spelling", "part_of_speech", "speech_for"]

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

#: Common Sino-Korean syllables and their Hanja (character, native gloss 훈, English gloss), the reading a model
#: would offer first leading.
_HANJA: dict[str, tuple[tuple[str, str, str], ...]] = {
    "학": (("學", "배울", "learning"),),
    "생": (("生", "날", "life"),),
    "대": (("大", "큰", "big"), ("代", "대신할", "generation")),
    "사": (("事", "일", "matter"), ("社", "모일", "company"), ("四", "넉", "four")),
    "일": (("日", "날", "day"), ("一", "한", "one")),
    "인": (("人", "사람", "person"), ("因", "인할", "cause")),
    "국": (("國", "나라", "country"),),
    "시": (("時", "때", "time"), ("市", "저자", "city"), ("詩", "시", "poem")),
    "자": (("自", "스스로", "self"), ("子", "아들", "child"), ("字", "글자", "letter")),
    "문": (("文", "글월", "writing"), ("門", "문", "gate"), ("問", "물을", "question")),
    "전": (("電", "번개", "electricity"), ("前", "앞", "before"), ("全", "온전할", "whole")),
    "정": (("正", "바를", "correct"), ("情", "뜻", "feeling"), ("定", "정할", "fixed")),
    "성": (("成", "이룰", "become"), ("性", "성품", "nature"), ("姓", "성씨", "surname")),
    "고": (("高", "높을", "high"), ("古", "옛", "old")),
    "수": (("水", "물", "water"), ("手", "손", "hand"), ("數", "셈", "number")),
    "동": (("東", "동녘", "east"), ("動", "움직일", "move"), ("同", "한가지", "same")),
    "실": (("室", "집", "room"), ("實", "열매", "real")),
    "명": (("名", "이름", "name"), ("明", "밝을", "bright")),
    "화": (("話", "말씀", "speech"), ("火", "불", "fire"), ("花", "꽃", "flower")),
    "기": (("氣", "기운", "energy"), ("期", "기약할", "period"), ("記", "기록할", "record")),
    "가": (("家", "집", "house"), ("歌", "노래", "song"), ("價", "값", "price")),
    "공": (("工", "장인", "work"), ("公", "공평할", "public"), ("空", "빌", "empty")),
    "교": (("校", "학교", "school"), ("敎", "가르칠", "teach")),
    "구": (("口", "입", "mouth"), ("九", "아홉", "nine")),
    "금": (("金", "쇠", "gold"),),
    "년": (("年", "해", "year"),),
    "도": (("道", "길", "way"), ("度", "법도", "degree")),
    "력": (("力", "힘", "power"),),
    "리": (("理", "다스릴", "reason"), ("里", "마을", "village")),
    "목": (("目", "눈", "eye"), ("木", "나무", "tree")),
    "물": (("物", "물건", "thing"),),
    "민": (("民", "백성", "people"),),
    "방": (("方", "모", "direction"), ("房", "방", "room")),
    "부": (("父", "아비", "father"), ("部", "떼", "part")),
    "산": (("山", "메", "mountain"),),
    "상": (("上", "윗", "above"), ("商", "장사", "trade")),
    "서": (("書", "글", "book"), ("西", "서녘", "west")),
    "선": (("先", "먼저", "first"), ("線", "줄", "line")),
    "세": (("世", "인간", "world"),),
    "소": (("小", "작을", "small"), ("所", "바", "place")),
    "식": (("食", "밥", "food"), ("式", "법", "style")),
    "신": (("新", "새", "new"), ("身", "몸", "body")),
    "심": (("心", "마음", "heart"),),
    "안": (("安", "편안", "peace"), ("案", "책상", "plan")),
    "어": (("語", "말씀", "language"),),
    "외": (("外", "바깥", "outside"),),
    "용": (("用", "쓸", "use"),),
    "우": (("友", "벗", "friend"), ("雨", "비", "rain")),
    "원": (("院", "집", "institution"), ("元", "으뜸", "origin")),
    "월": (("月", "달", "month"),),
    "유": (("有", "있을", "have"),),
    "의": (("意", "뜻", "meaning"), ("醫", "의원", "medicine")),
    "장": (("長", "긴", "long"), ("場", "마당", "place")),
    "주": (("主", "주인", "master"), ("住", "살", "dwell")),
    "중": (("中", "가운데", "middle"), ("重", "무거울", "heavy")),
    "지": (("地", "땅", "earth"), ("知", "알", "know")),
    "차": (("車", "수레", "vehicle"), ("茶", "차", "tea")),
    "천": (("天", "하늘", "sky"), ("千", "일천", "thousand")),
    "체": (("體", "몸", "body"),),
    "통": (("通", "통할", "pass through"),),
    "한": (("韓", "한국", "Korea"), ("漢", "한수", "Han")),
    "행": (("行", "다닐", "go"),),
    "회": (("會", "모일", "meeting"),),
    "후": (("後", "뒤", "after"),),
    "관": (("關", "관계할", "relation"), ("館", "집", "building")),
    "경": (("京", "서울", "capital"), ("經", "지날", "pass")),
    "계": (("計", "셀", "plan"), ("界", "지경", "world")),
    "개": (("開", "열", "open"),),
    "병": (("病", "병", "illness"),),
    "간": (("間", "사이", "interval"),),
    "감": (("感", "느낄", "feeling"),),
    "강": (("江", "강", "river"),),
    "과": (("科", "과목", "subject"), ("過", "지날", "pass")),
    "남": (("男", "사내", "man"), ("南", "남녘", "south")),
    "녀": (("女", "여자", "woman"),),
    "여": (("女", "여자", "woman"), ("旅", "나그네", "travel")),
    "독": (("讀", "읽을", "read"),),
    "면": (("面", "낯", "face"),),
    "무": (("無", "없을", "none"),),
    "미": (("美", "아름다울", "beauty"), ("未", "아닐", "not yet")),
    "반": (("半", "반", "half"),),
    "발": (("發", "필", "emit"),),
    "백": (("白", "흰", "white"), ("百", "일백", "hundred")),
    "법": (("法", "법", "law"),),
    "분": (("分", "나눌", "part"),),
    "색": (("色", "빛", "colour"),),
    "업": (("業", "업", "work"),),
    "역": (("驛", "역", "station"),),
    "영": (("英", "꽃부리", "English"), ("映", "비칠", "reflect")),
    "음": (("音", "소리", "sound"), ("飮", "마실", "drink")),
    "입": (("入", "들", "enter"),),
    "작": (("作", "지을", "make"),),
    "점": (("點", "점", "point"), ("店", "가게", "shop")),
    "조": (("朝", "아침", "morning"),),
    "족": (("族", "겨레", "family"),),
    "집": (("集", "모을", "gather"),),
    "책": (("冊", "책", "book"),),
    "초": (("初", "처음", "beginning"),),
    "출": (("出", "날", "go out"),),
    "친": (("親", "친할", "intimate"),),
    "특": (("特", "특별할", "special"),),
    "표": (("表", "겉", "surface"), ("票", "표", "ticket")),
    "품": (("品", "물건", "goods"),),
    "해": (("海", "바다", "sea"), ("害", "해할", "harm")),
    "현": (("現", "나타날", "present"),),
    "형": (("兄", "형", "elder brother"), ("形", "모양", "shape")),
    "활": (("活", "살", "living"),),
    "휴": (("休", "쉴", "rest"),),
    "제": (("題", "제목", "topic"), ("弟", "아우", "younger brother")),
}
_MAX_HANJA_SYLLABLES = 4

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


def hanja_spelling(term: str, pos: PartOfSpeech) -> tuple[HanjaSpelling | None, list[tuple[str, ...]]]:
    """The Hanja of a short Korean noun whose every syllable is a common Sino-Korean one, character by character,
    and the other spellings of the same sound (the homonyms a model would list) as (syllables, *characters)."""
    syllables = term.strip()
    heads = head_candidates(syllables)
    if heads and PartOfSpeech.NOUN in heads[0].classes and heads[0].lemma in syllables:
        syllables = heads[0].lemma  # 문제가 is 문제 + subject particle: only the noun has Hanja
    if pos is not PartOfSpeech.NOUN or not 1 <= len(syllables) <= _MAX_HANJA_SYLLABLES:
        return None, []
    if not all(s in _HANJA for s in syllables):
        return None, []
    combos = list(itertools.product(*(_HANJA[s] for s in syllables)))
    first = combos[0]
    spelling = HanjaSpelling(
        hanja="".join(c for c, _, _ in first),
        characters=[HanjaCharacter(character=c, meaning=hun, reading=s, gloss=gloss)
                    for (c, hun, gloss), s in zip(first, syllables, strict=True)])
    return spelling, [(syllables, *(c for c, _, _ in combo)) for combo in combos[1:]]


#: Native Korean words that sound alike, the classic homonyms.
_NATIVE_HOMONYMS: dict[str, tuple[tuple[str, str], ...]] = {
    "눈": (("eye", "snow"),), "배": (("pear", "boat"),), "말": (("horse", "speech"),), "밤": (("night", "chestnut"),),
    "차": (("tea", "car"),), "다리": (("leg", "bridge"),), "손": (("hand", "guest"),), "발": (("foot", "blind"),),
}


def _homonyms(term: str, meaning: str, others: list[tuple[str, ...]], rng: random.Random) -> list[Homonym]:
    homonyms: list[Homonym] = []
    for first, second in _NATIVE_HOMONYMS.get(term, ()):
        other = second if first.lower() in meaning.lower() else first
        homonyms.append(Homonym(hanja=None, reading=term, meaning=other,
                                differentiator=_clip(f"The same sound {term} also means '{other}'; the sentence "
                                                     "around it tells which one is meant.", _MEDIUM)))
    if others and rng.random() < 0.6:
        syllables, *combo = rng.choice(others)
        spelled = "".join(combo)
        glosses = " + ".join(g for syllable, char in zip(syllables, combo, strict=True)
                             for c, _, g in _HANJA.get(syllable, ()) if c == char)
        homonyms.append(Homonym(
            hanja=spelled, reading=syllables, meaning=_clip(glosses or spelled, _SHORT),
            differentiator=_clip(f"Written {spelled} ({glosses}); the characters, not the sound, tell it apart "
                                 f"from {term}.", _MEDIUM)))
    return homonyms[:5]


def _ipa(term: str, hints: Mapping[str, str], korean: bool) -> str:
    given = _hint(hints, "IPA_Pronunciation") or _hint(hints, "IPA")
    if given:
        return _clip(given, _SHORT)
    ipa = hangul_ipa(term) if korean else ""
    return _clip(ipa, _SHORT) if ipa else f"/{_clip(term.lower(), _SHORT - 2)}/"


def _korean_pos(term: str, given: PartOfSpeech) -> PartOfSpeech:
    """The list's class when the analyser allows it, else the analyser's best guess (as a careful model would)."""
    if " " in term.strip():
        return given
    candidates = head_candidates(term)
    allowed = frozenset().union(*(h.classes for h in candidates)) if candidates else frozenset()
    if not allowed or given in allowed:
        return given
    return next(iter(sorted(candidates[0].classes))) if candidates[0].classes else given


_STEM_TAG = {PartOfSpeech.VERB: "VV", PartOfSpeech.ADJECTIVE: "VA"}
_CONJUGATIONS = (
    ("present polite (-아요/어요)", (("어요", "EF"),)),
    ("past polite (-았어요/었어요)", (("었", "EP"), ("어요", "EF"))),
    ("future / intention (-겠어요)", (("겠", "EP"), ("어요", "EF"))),
    ("connective 'and' (-고)", (("고", "EC"),)),
)
_HONORIFICS = (
    ("formal polite (-습니다)", (("습니다", "EF"),)),
    ("honorific polite (-(으)세요)", (("으세요", "EF"),)),
)
#: Words with an honorific or humble counterpart of their own.
_HONORIFIC_WORDS = {
    "먹다": "드시다", "마시다": "드시다", "자다": "주무시다", "있다": "계시다", "말하다": "말씀하시다",
    "주다": "드리다", "나": "저", "내가": "제가", "내": "제", "난": "전", "우리": "저희", "집": "댁", "밥": "진지",
    "이름": "성함", "나이": "연세", "말": "말씀", "사람": "분",
}


def _forms(term: str, pos: PartOfSpeech) -> tuple[list[Form], list[Form]]:
    """Conjugated and honorific forms, conjugated by the analyser (irregular stems included)."""
    honorific_word = _HONORIFIC_WORDS.get(term)
    honorifics = [Form(label="honorific / humble word", form=honorific_word)] if honorific_word else []
    tag = _STEM_TAG.get(pos)
    if tag is None or not _dictionary_form(term):
        return [], honorifics
    stem = term[:-1]
    conjugations = [Form(label=label, form=_clip(join([(stem, tag), *ending]), _SHORT))
                    for label, ending in _CONJUGATIONS]
    honorifics = [Form(label=label, form=_clip(join([(stem, tag), *ending]), _SHORT))
                  for label, ending in _HONORIFICS] + honorifics
    return conjugations, honorifics[:4]


def _generated_example(term: str, pos: PartOfSpeech, meaning: str) -> ExampleSentence:
    """A short sentence that uses the term as its class allows (the verb stem takes -고 싶어요, which never
    contracts, so the sentence always contains the stem)."""
    gloss = meaning.split(";")[0].split(",")[0].strip() or meaning
    if pos in (PartOfSpeech.VERB, PartOfSpeech.ADJECTIVE, PartOfSpeech.INTERJECTION) and not _dictionary_form(term):
        return ExampleSentence(sentence=f"네, {term}.", translation=f"Yes, {gloss}.")  # an inflected form as listed
    if pos in (PartOfSpeech.VERB, PartOfSpeech.ADJECTIVE):
        stem = term[:-1]
        if pos is PartOfSpeech.VERB:
            return ExampleSentence(sentence=f"저는 오늘 {stem}고 싶어요.", translation=f"I want to {gloss} today.")
        return ExampleSentence(sentence=f"오늘은 정말 {stem}지 않아요.", translation=f"Today it is not really {gloss}.")
    if pos is PartOfSpeech.ADVERB:
        return ExampleSentence(sentence=f"친구가 {term} 왔어요.", translation=f"My friend came ({gloss}).")
    if pos is PartOfSpeech.PARTICLE:
        for sentence, translation in ((f"학교{term} 친구를 만났어요.", f"I met a friend ({gloss}: school)."),
                                      (f"민수{term}, 안녕!", f"Minsu ({gloss}), hi!")):
            if locate(term, sentence) is not None:
                return ExampleSentence(sentence=sentence, translation=translation)
        return ExampleSentence(sentence=f"{term} 뭐예요?", translation=f"What is {gloss}?")
    if pos is PartOfSpeech.DETERMINER:
        return ExampleSentence(sentence=f"{term} 사람을 알아요.", translation=f"I know {gloss} person.")
    if pos is PartOfSpeech.INTERJECTION:
        return ExampleSentence(sentence=f"{term}, 정말요?", translation=f"{gloss}, really?")
    return ExampleSentence(sentence=f"{term} 정말 좋아요.", translation=f"{gloss}: really good.")


def _dictionary_form(term: str) -> bool:
    """먹다 is a dictionary form; 합니다 and 먹어 are inflected ones (their lemma differs from the term)."""
    heads = head_candidates(term)
    return term.endswith("다") and len(term) > 1 and bool(heads) and heads[0].lemma == term


def _example(term: str, pos: PartOfSpeech, meaning: str, hints: Mapping[str, str], korean: bool) -> ExampleSentence:
    sentence = _hint(hints, "Example_Sentence")
    translation = _hint(hints, "Example_Sentence_Translation")
    if sentence and translation and (not korean or locate(term, sentence) is not None):
        return ExampleSentence(sentence=_clip(sentence, _MEDIUM), translation=_clip(translation, _MEDIUM))
    if korean:
        return _generated_example(term, pos, meaning)
    return ExampleSentence(sentence=_clip(f"{term}!", _MEDIUM), translation=_clip(f"{meaning}!", _MEDIUM))


def _related(term: str, pos: PartOfSpeech, korean: bool, rng: random.Random) -> tuple[list[str], list[str]]:
    if not korean:
        return [], []
    pool = [w for w in _KOREAN_CONFUSABLES.get(pos, ()) if w != term]
    synonyms = rng.sample(pool, min(len(pool), rng.randint(0, 2)))
    antonyms = [w for w in pool if w not in synonyms][:rng.randint(0, 1)]
    return synonyms, antonyms


def _collocations(term: str, pos: PartOfSpeech, korean: bool) -> list[str]:
    if not korean:
        return []
    if pos is PartOfSpeech.VERB and _dictionary_form(term):
        phrases = [f"자주 {term}", f"같이 {term}"]
    elif pos is PartOfSpeech.ADJECTIVE and _dictionary_form(term):
        phrases = [f"아주 {term}", f"정말 {term}"]
    elif pos is PartOfSpeech.NOUN:
        phrases = [f"{term}에 가다", f"{term}을 좋아하다" if _has_final(term) else f"{term}를 좋아하다"]
    else:
        phrases = []
    return [_clip(phrase, _SHORT) for phrase in phrases]


def _has_final(word: str) -> bool:
    last = word[-1]
    return _is_hangul(last) and (ord(last) - _HANGUL_FIRST) % 28 != 0


def analysis_for(
    term: str,
    *,
    type: str | None = None,
    language: str = "Korean",
    learner_language: str = "English",
    hints: Mapping[str, str] | None = None,
    seed: int = 0,
) -> TermAnalysis:
    """A plausible stage-1 answer for ``term`` that passes the content checks; the same arguments always give the
    same analysis."""
    term = term.strip()
    if not term:
        raise ValueError("term must not be blank")
    hints = hints or {}
    rng = random.Random(f"{seed}:{term}")
    korean = _is_korean(term, language)
    pos = part_of_speech(type or _hint(hints, "Word_Type"))
    if korean:
        pos = _korean_pos(term, pos)
    quoted = _clip(term, _QUOTE)
    definition = _hint(hints, "Definition")
    spoken = pronounce(term) if korean else None
    fallback = f"'{spoken.romanization}' (simulated sense)" if spoken else f"{quoted} (core sense)"
    meaning = _clip(definition or fallback, _SHORT)
    short_meaning = _clip(meaning, _QUOTE)

    noun = rng.choice(_METAPHOR_NOUNS)
    action = rng.choice(_METAPHOR_ACTIONS)
    location = rng.choice(_LOCATIONS)
    anchor = rng.choice(_ANCHORS)
    sensory = rng.choice(_SENSES).format(anchor=anchor)

    explanation = (f"{quoted} is a {pos.value} meaning '{short_meaning}'. Learners of {language} usually meet it "
                   f"early; say it aloud while holding the image of {anchor}.")

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

    spelling, other_spellings = hanja_spelling(term, pos) if korean else (None, [])
    conjugations, honorifics = _forms(term, pos) if korean else ([], [])
    synonyms, antonyms = _related(term, pos, korean, rng)
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
        explanation=_clip(explanation, _LONG),
        usage_context=usage_context,
        comparison=comparison,
        homonyms=_homonyms(term, meaning, other_spellings, rng) if korean else [],
        keywords=keywords,
        example=_example(term, pos, meaning, hints, korean),
        conjugations=conjugations,
        honorifics=honorifics,
        synonyms=synonyms,
        antonyms=antonyms,
        collocations=_collocations(term, pos, korean),
        hanja=spelling,
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
    """A plausible stage-2 answer: 2-4 optional cards (recognition and production are made from the analysis),
    with a Hanja card exactly when the analysis spells the term in Hanja; the level tag follows the input's
    TOPIK_Level column when it has one."""
    term = term.strip() or analysis.term
    rng = random.Random(f"{seed}:{term}:cards")
    korean = _is_korean(term, language)
    quoted = _clip(term, _QUOTE)
    meaning = _clip(analysis.primary_meaning, 80)

    optional: list[CardType] = [CardType.SCENE, CardType.EXAMPLE, CardType.GRAMMAR, CardType.CULTURAL]
    if korean:
        optional.append(CardType.FORMAL_CASUAL)
    if analysis.comparison is not None:
        optional.append(CardType.USAGE_COMPARISON)
    required = [CardType.HANJA] if analysis.has_hanja else []
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
    """Fronts never show the term where it is the answer; backs answer only their own front."""
    if card_type is CardType.SCENE:
        hidden = meaning.replace(term, "…")  # a list's definition may quote the word itself
        return (f"At {analysis.suggested_location}, {analysis.anchor_object}: {_a(analysis.metaphor_noun)} "
                f"that {analysis.metaphor_action} '{hidden}' ({analysis.pos.value}). Which word is it?",
                f"The {analysis.metaphor_noun} is the word for '{meaning}'.")
    if card_type is CardType.HANJA and analysis.hanja is not None:
        parts = " + ".join(f"{c.character} {c.meaning} {c.reading} ({c.gloss})" for c in analysis.hanja.characters)
        return (f"Which Hanja are behind {term} (meaning '{meaning}')?", f"{analysis.hanja.hanja}: {parts}")
    if card_type is CardType.USAGE_COMPARISON and analysis.comparison is not None:
        return (f"{term} or {analysis.comparison.vs}: which one means '{meaning}' here?",
                f"{term}. {analysis.comparison.nuance}")
    if card_type is CardType.GRAMMAR:
        return (f"How does the {analysis.pos.value} {term} fit into a sentence?",
                f"{_GRAMMAR_NOTES[analysis.pos][:1].upper()}{_GRAMMAR_NOTES[analysis.pos][1:]}.")
    if card_type is CardType.FORMAL_CASUAL:
        return (f"Is {term} ('{meaning}') polite enough for a job interview?",
                "Match the ending to the listener: -습니다 when formal, -아/어 with close friends.")
    if card_type is CardType.CULTURAL:
        context = analysis.usage_context or f"Everyday situations where '{meaning}' comes up."
        return (f"When would a native speaker say {term}?", context)
    example = analysis.example
    return (f"Fill the gap with the word for '{meaning}'.",
            example.sentence if example else f"{term} — {meaning}")


_SPEECH_RATE = 16_000


def speech_for(text: str) -> bytes:
    """A short, valid MP3 standing in for spoken ``text``: a soft tone whose pitch comes from the text and whose
    length grows with it (0.2 to 1.5 s), the same bytes every time."""
    rng = random.Random(f"speech:{text}")
    seconds = min(1.5, 0.2 + 0.03 * len(text))
    pitch = 180 + rng.random() * 140
    count = int(_SPEECH_RATE * seconds)
    samples = (int(6000 * math.sin(2 * math.pi * pitch * i / _SPEECH_RATE) * min(1.0, i / 800, (count - i) / 800))
               for i in range(count))
    return encode_mp3(struct.pack(f"<{count}h", *samples), rate=_SPEECH_RATE)
