"""A rule-based stand-in for the teacher LLM: no network, deterministic, varied.

It reads only what the request carries, the same information a teacher LLM would
get, and writes first-person statements with several sentence patterns per kind,
choosing the pattern (and small details) by a hash of the request key and the seed:

* preference (P2): recurring platforms, recurring franchises (shared leading title
  words), genres guessed from a small keyword lexicon or taken from the history's
  categories, a recent example title;
* vague intention (I1): the first sentence of the target review (or, lacking one,
  of the description), scrubbed of the target title, with cues such as "a gift
  for my son" or "something to play with friends"; lacking both, a guessed genre,
  the categories or a couple of title words -- never the full title;
* specific intention (I2): the platform and/or the categories of the target, as a
  short search request.

It returns None when there is nothing to go on.

Every sentence frame is a named phrasing family (:mod:`instructrec.training.annotate.frames`),
and so are the modifiers some answers get (platform aliases, seeded misspellings). Version 2
(``offline-v2``) added frames, compositional needs ("racing, not too violent, for Nintendo
Wii"), negations ("nothing with horror") and the modifiers, and writes with the training
families only unless asked for another phrasing (:mod:`instructrec.training.annotate.phrasing`).
"""

from __future__ import annotations

import hashlib
import html
import re
from collections import Counter

from instructrec.training.annotate.frames import (
    PREFERENCE,
    SPECIFIC_CATEGORY,
    SPECIFIC_PLATFORM,
    SPECIFIC_PLATFORM_CATEGORY,
    VAGUE_DESCRIPTION,
    VAGUE_REVIEW,
    VAGUE_TITLE,
    Frame,
)
from instructrec.training.annotate.phrasing import ALIASES, TYPOS, alias, allowed, misspell
from instructrec.training.annotate.teachers import AnnotationRequest, Kind, facets, platform_of, split_platform

# Genre lexicon for game titles: the first genre (in this order) with a keyword in the title wins.
_GENRES: list[tuple[str, tuple[str, ...]]] = [
    ("racing", ("racing", "racer", "rally", "kart", "need for speed", "forza", "gran turismo", "nascar",
                "burnout", "motorsport", "formula 1", "drift", "midnight club", "motorstorm", "dirt", "crash team")),
    ("party", ("mario party", "wii sports", "wii fit", "party", "fitness", "trivia", "board game", "monopoly",
               "scene it", "buzz!", "wii play")),
    ("music and rhythm", ("guitar hero", "rock band", "dj hero", "band hero", "just dance", "dance", "singstar",
                          "karaoke", "rhythm")),
    ("sports", ("nfl", "nba", "nhl", "mlb", "fifa", "madden", "golf", "tennis", "soccer", "football", "baseball",
                "basketball", "hockey", "skate", "tony hawk", "wwe", "smackdown", "ufc", "boxing", "olympic",
                "sports", "wrestling", "pro evolution")),
    ("horror", ("resident evil", "silent hill", "dead space", "zombie", "zombies", "evil within", "outlast",
                "alan wake", "fatal frame", "left 4 dead", "dead rising", "amnesia", "until dawn", "horror")),
    ("shooter", ("call of duty", "battlefield", "battlefront", "halo", "gears of war", "sniper", "shooter",
                 "counter-strike", "borderlands", "doom", "wolfenstein", "far cry", "crysis", "killzone", "destiny",
                 "overwatch", "titanfall", "medal of honor", "rainbow six", "ghost recon", "unreal tournament",
                 "quake", "bioshock", "resistance", "socom", "time crisis")),
    ("fighting", ("tekken", "street fighter", "mortal kombat", "soulcalibur", "soul calibur", "smash bros",
                  "fighter", "fighters", "dragon ball", "naruto", "injustice", "dead or alive", "blazblue",
                  "marvel vs", "king of fighters", "guilty gear")),
    ("role-playing", ("final fantasy", "dragon quest", "fallout", "elder scrolls", "skyrim", "oblivion", "persona",
                      "kingdom hearts", "mass effect", "witcher", "pokemon", "pok\u00e9mon", "tales of",
                      "shin megami", "fire emblem", "diablo", "dragon age", "xenoblade", "star ocean", "chrono",
                      "baldur's gate", "neverwinter", "dark souls", "demon's souls", "bloodborne", "rpg", "disgaea",
                      "ni no kuni", "warcraft", "guild wars", "phantasy star", "atelier", "monster hunter")),
    ("platformer", ("mario", "sonic", "crash bandicoot", "spyro", "rayman", "kirby", "donkey kong", "ratchet",
                    "jak and daxter", "sly cooper", "banjo", "littlebigplanet", "little big planet", "mega man",
                    "megaman", "yoshi", "platformer")),
    ("strategy", ("civilization", "starcraft", "total war", "command & conquer", "command and conquer",
                  "age of empires", "xcom", "tactics", "strategy", "warhammer", "company of heroes",
                  "heroes of might", "advance wars", "rts")),
    ("simulation", ("the sims", "sims", "simcity", "tycoon", "simulator", "flight", "harvest moon",
                    "animal crossing", "roller coaster", "zoo", "farming")),
    ("puzzle", ("puzzle", "tetris", "hidden object", "hidden objects", "brain age", "professor layton", "portal",
                "sudoku", "mahjong", "jigsaw", "bejeweled", "solitaire", "picross")),
    ("action-adventure", ("zelda", "uncharted", "tomb raider", "assassin's creed", "grand theft auto", "gta",
                          "god of war", "batman", "arkham", "metal gear", "devil may cry", "prince of persia",
                          "red dead", "hitman", "splinter cell", "infamous", "adventure", "lego", "spider-man",
                          "spiderman", "star wars", "legend of", "ninja gaiden", "castlevania", "metroid")),
]
_ACCESSORIES = (
    "controller", "headset", "headphones", "mouse", "keyboard", "cable", "charger", "charging station", "case",
    "memory card", "battery", "stand", "skin", "adapter", "remote", "steering wheel", "joystick", "mouse pad",
    "mousepad", "dock", "stylus", "grip", "thumb grips", "cover", "screen protector", "console", "sensor",
    "microphone", "speaker", "cooling fan", "hdmi", "power supply", "faceplate", "webcam", "camera", "nunchuk",
    "gamepad", "arcade stick", "fight stick", "hard drive",
)


def _kw_regex(words) -> re.Pattern:
    alts = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alts})(?![a-z0-9])")


_GENRE_RES = [(genre, _kw_regex(words)) for genre, words in _GENRES]
_ACCESSORY_RE = _kw_regex(_ACCESSORIES)

_STOP = {
    "a", "an", "the", "of", "and", "or", "for", "to", "in", "on", "with", "at", "by", "from", "vs", "vs.", "&",
    "edition", "standard", "game", "games", "video", "version", "pack", "bundle", "collection", "limited",
    "deluxe", "special", "digital", "code", "download", "complete", "ultimate", "new", "official", "gaming",
    "nintendo", "sony", "microsoft", "xbox", "playstation", "pc", "ps2", "ps3", "ps4", "wii", "ds", "3ds",
    "black", "white", "blue", "red", "green", "usb", "wireless", "wired", "hd", "remastered", "year", "goty",
    "import", "only", "is", "it", "this", "that", "my", "your", "de", "la", "le", "ii", "iii", "iv", "2", "3",
}
_PLATFORM_WORDS = {"xbox", "playstation", "nintendo", "sony", "microsoft", "pc", "sega", "wii", "ds", "3ds", "psp",
                   "ps2", "ps3", "ps4", "ps vita", "gamecube", "game boy", "gameboy"}

_RECIPIENT_RE = re.compile(
    r"\b(?:my|our|for (?:my|our))\s+(?:\d+\s*(?:year|yr)s?[- ]old\s+)?"
    r"(son|daughter|kids?|children|grandsons?|granddaughters?|grandkids|nephews?|nieces?|husband|wife|"
    r"boyfriend|girlfriend|brother|sister|dad|father|mom|mother|family|boys|girls)\b",
    re.I,
)
_SOCIAL_RE = re.compile(r"\b(multiplayer|multi-player|co-op|coop|split[- ]screen|with (?:my )?friends|online play)\b", re.I)
_QUALITIES: list[tuple[str, str]] = [
    (r"\bfun\b", "fun"), (r"\baddict", "addictive"), (r"\bchalleng", "challenging"), (r"\beasy\b", "easy to pick up"),
    (r"\brelax", "relaxing"), (r"\bscary|\bcreepy", "scary"), (r"\bbeautiful|\bgorgeous|\bgraphics", "good-looking"),
    (r"\bfunny|\bhilarious", "funny"), (r"\bcomfortable|\bcomfy", "comfortable"), (r"\bdurable|\bsturdy|\bwell made", "sturdy"),
    (r"\bcheap\b|\baffordable|\bprice", "affordable"), (r"\bstory|\bplot|\bnarrative", "story-driven"),
    (r"\bnostalgi|\bchildhood|\bretro", "nostalgic"), (r"\breliable|\bworks (?:great|perfectly|well)", "reliable"),
    (r"\bimmersive", "immersive"), (r"\breplay", "replayable"),
]


_DASH_SEP = re.compile(r"\s+[-\u2013\u2014]+\s*|\s*[-\u2013\u2014]+\s+")


def _clean(text: str) -> str:
    text = html.unescape(text or "")
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _core(title: str) -> str:
    """The title without platform, bracketed notes and trailing edition segments."""
    core = split_platform(_clean(title))[0]
    core = re.sub(r"\s*[\[(][^\])]*[\])]", "", core)
    core = re.sub(r"\s+[-\u2013]\s+[^-\u2013]*\b(edition|pre-load|bundle|version)\b[^-\u2013]*$", "", core, flags=re.I)
    return core.strip(" -:,") or _clean(title)


def _title_heads(title: str) -> list[str]:
    """The title up to each " - " separator ("Madden NFL 17", "Madden NFL 17 - Standard Edition"),
    when at least two words long: also names of the item, so never to be repeated."""
    heads = []
    for m in _DASH_SEP.finditer(title):
        head = title[: m.start()].strip()
        if len(head.split()) >= 2:
            heads.append(head)
    return heads


def _genre(title: str) -> str | None:
    low = _core(title).lower()
    for genre, rx in _GENRE_RES:
        if rx.search(low):
            return genre
    return None


def _accessory(title: str) -> str | None:
    m = _ACCESSORY_RE.search(_core(title).lower())
    return m.group(0) if m else None


def _an(phrase: str) -> str:
    """"an action game", "an Xbox 360 player", "an NES game", "a PC game"."""
    first = phrase.split(" ", 1)[0] if phrase else ""
    vowel_sound = first[:1].lower() in "aeiou" or first[:1] == "X" or (
        first.isupper() and len(first) > 1 and first[:1] in "FHLMNRSX"
    )
    return ("an " if vowel_sound else "a ") + phrase


def _short(core: str, max_words: int = 8) -> str:
    """A readable mention of a (possibly very long accessory) title."""
    short = re.split(r",\s|\s[-\u2013]\s|\s\(", core)[0].strip()
    words = short.split()
    if len(words) > max_words:
        words = words[:6]
        while len(words) > 1 and words[-1].lower().strip(",.:;") in _STOP:
            words.pop()
        short = " ".join(words).rstrip(",.:;")
    return short


def _plural(noun: str) -> str:
    if noun.endswith("mouse"):
        return noun[:-5] + "mice"
    if noun.endswith("s") and not noun.endswith("ss"):
        return noun
    if noun.endswith(("ss", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _join(xs: list[str]) -> str:
    xs = [x for x in xs if x]
    if len(xs) <= 1:
        return "".join(xs)
    return ", ".join(xs[:-1]) + " and " + xs[-1]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9][A-Za-z0-9'&.\-]*", text)


def _first_sentence(text: str, max_words: int = 28) -> str:
    text = _clean(text)
    if not text:
        return ""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    chosen = next((s for s in sentences if len(s.split()) >= 4), sentences[0])
    words = chosen.split()
    if len(words) > max_words:
        chosen = " ".join(words[:max_words]).rstrip(",;:-") + "."
    if chosen and chosen[-1] not in ".!?":
        chosen += "."
    return chosen


def _lower_first(s: str) -> str:
    if not s:
        return s
    first = s.split(" ", 1)[0]
    if first in ("I", "I'm", "I've", "I'd", "I'll") or (len(first) > 1 and first[1:2].isupper()):
        return s
    return s[0].lower() + s[1:]


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _scrub(text: str, titles: list[str]) -> str:
    """Replace any occurrence of the given titles (case-insensitive) with "it"."""
    for t in sorted({t.strip() for t in titles if t and len(t.strip()) >= 3}, key=len, reverse=True):
        text = re.sub(re.escape(t), "it", text, flags=re.I)
    text = re.sub(r"(^|[.!?]\s+)it\b", lambda m: m.group(1) + "It", text)
    return text


# The tone a need may ask for, by genre (new in offline-v2's compositional frames).
_TONES: dict[str, tuple[str, ...]] = {
    "racing": ("fast", "not too violent"), "party": ("good with a group", "family-friendly"),
    "music and rhythm": ("good with a group", "not too violent"), "sports": ("competitive", "not too violent"),
    "horror": ("properly scary", "tense"), "shooter": ("fast and intense", "action-packed"),
    "fighting": ("competitive", "action-packed"), "role-playing": ("long and story-heavy", "immersive"),
    "platformer": ("not too violent", "family-friendly"), "strategy": ("slow and thoughtful", "not too violent"),
    "simulation": ("relaxed", "not too violent"), "puzzle": ("relaxed", "family-friendly"),
    "action-adventure": ("story-driven", "adventurous"),
}
_STYLE_PERCENT = 25  # how often a compositional or negating style is drawn when one fits


class OfflineTeacher:
    """Deterministic rule-based teacher; see the module docstring. ``phrasing`` picks the
    families it writes with (:mod:`instructrec.training.annotate.phrasing`); training uses
    ``in-family``, evaluation may ask for ``held-out``."""

    max_concurrency = 1

    def __init__(self, seed: int = 0, phrasing: str = "in-family"):
        self.seed = int(seed)
        self.phrasing = phrasing
        self.families = allowed(phrasing)
        self._used: list[str] = []  # the families of the answer being written (see explain)
        # Seed and phrasing change the answers, so both are part of the name (and of cache identity).
        # "v1" writes exactly what offline-v1 wrote, so it keeps that name and its caches.
        name = "offline-v1" if phrasing == "v1" else "offline-v2" + ("" if phrasing == "in-family" else f":{phrasing}")
        self.name = name if self.seed == 0 else f"{name}:seed{self.seed}"

    # -- helpers --------------------------------------------------------------------------
    def _h(self, key: str, salt: str, n: int) -> int:
        digest = hashlib.sha256(f"{self.seed}|{key}|{salt}".encode()).hexdigest()
        return int(digest[:12], 16) % n if n > 0 else 0

    def _choose(self, key: str, salt: str, frames: tuple[Frame, ...] | list[Frame], slots: dict[str, str],
                spread: int | None = None) -> str | None:
        feasible = [f for f in frames if f.family in self.families and all(slots.get(s) for s in f.needs)]
        if not feasible:
            return None
        styled = [f for f in feasible if f.styled]
        plain = [f for f in feasible if not f.styled]
        if styled and (not plain or self._h(key, salt + "|style", 100) < _STYLE_PERCENT):
            frame = styled[self._h(key, salt + "|styled", len(styled))]
        else:
            richest = max(len(f.needs) for f in plain)
            # Use what is known: the richest frames, and one slot less only when that is still rich.
            floor = richest - (spread if spread is not None else (1 if richest >= 3 else 0))
            pool = [f for f in plain if len(f.needs) >= floor]
            frame = pool[self._h(key, salt, len(pool))]
        self._used.insert(0, frame.family)
        text, family = frame.text.format(**slots), self._alias_family(key)
        if family:
            aliased = frame.text.format(**self._aliased(slots, family))
            if aliased != text:
                self._used.append(family)
                return aliased
        return text

    def _alias_family(self, key: str) -> str | None:
        """The alias family of about 3 answers in 10 (None for the others)."""
        aliases = [m for m in ALIASES if m in self.families]
        if not aliases or self._h(key, "modifier", 10) >= 3:
            return None
        return aliases[self._h(key, "alias", len(aliases))]

    @staticmethod
    def _aliased(slots: dict[str, str], family: str) -> dict[str, str]:
        """The platform slots under an alias family (the slots only: an example title keeps its
        own spelling)."""
        out = dict(slots)
        for name in ("P", "all", "looking"):
            if out.get(name):
                out[name] = alias(out[name], family)
        if out.get("aP"):
            out["aP"] = _an(out["P"])
        return out

    def _modify(self, key: str, text: str | None) -> str | None:
        """In about 2 answers of 10, a misspelling from one of this phrasing's typo families."""
        typos = [m for m in TYPOS if m in self.families]
        if not text or not typos or not 3 <= self._h(key, "modifier", 10) < 5:
            return text
        family = typos[self._h(key, "typos", len(typos))]
        changed = misspell(text, family, key, self.seed)
        if changed != text:
            self._used.append(family)
        return changed

    def _tone(self, key: str, genre: str | None) -> str:
        tones = _TONES.get(genre or "", ())
        return tones[self._h(key, "tone", len(tones))] if tones else ""

    def _other_genre(self, key: str, avoid: set[str]) -> str:
        """A genre to say no to: a seeded one of the lexicon's not in ``avoid``."""
        names = [g for g, _ in _GENRES if g not in avoid]
        return names[self._h(key, "negation", len(names))] if names else ""

    async def annotate(self, request: AnnotationRequest) -> str | None:
        return self.annotate_sync(request)

    def annotate_sync(self, request: AnnotationRequest) -> str | None:
        return self.explain(request)[0]

    def explain(self, request: AnnotationRequest) -> tuple[str | None, tuple[str, ...]]:
        """The answer and the families that wrote it (its frame, and each modifier that changed it),
        so that a split can be checked on what the teacher really wrote."""
        self._used: list[str] = []
        if request.kind is Kind.PREFERENCE:
            text = self._preference(request)
        elif request.kind is Kind.VAGUE:
            text = self._vague(request)
        else:
            text = self._specific(request)
        text = self._modify(request.key(), text)
        return text, (tuple(self._used) if text else ())

    # -- P2 -------------------------------------------------------------------------------
    def _preference(self, r: AnnotationRequest) -> str | None:
        titles = [_clean(t) for t in r.history_titles if t and t.strip()]
        if not titles:
            return None
        key = r.key()
        recent_first = titles[::-1]
        cores = [_core(t) for t in recent_first]
        platform_phrase, plats = _platform_phrase(titles)
        franchise = _franchise(cores)
        genre_phrase, genres = _genre_phrase(titles)
        cat_phrase = _category_phrase(r.history_categories, plats)
        accessories = Counter(a for a in (_accessory(t) for t in titles) if a)
        acc_phrase = _join([_plural(a) for a, _ in accessories.most_common(2)]) if sum(accessories.values()) >= 2 else ""
        example = self._example_phrase(key, cores, recent_first, franchise, genres)

        the_franchise = franchise if franchise.lower().startswith("the ") else f"the {franchise}"
        top = genres.most_common(1)[0][0] if genres else None
        slots = {"P": platform_phrase, "G": genre_phrase, "F": franchise, "TF": the_franchise, "aP": _an(platform_phrase) if platform_phrase else "", "E": example,
                 "C": cat_phrase, "A": acc_phrase, "T": self._tone(key, top) if genre_phrase else "",
                 "N": self._other_genre(key, set(genres)) if not cat_phrase else ""}
        # Category phrases describe the data better than the games lexicon when both exist.
        if cat_phrase:
            slots["G"] = slots["T"] = ""
        text = self._choose(key, "preference", PREFERENCE, slots)
        if text and acc_phrase and "{A}" not in text and "gear" not in text and self._h(key, "acc", 2):
            text += f" I also pick up gear like {acc_phrase}."
        return _upper_first(text) if text else None

    def _example_phrase(self, key: str, cores: list[str], recent_first: list[str], franchise: str,
                        genres: Counter) -> str:
        """One to three example titles, preferring those of the franchise or the top genre."""
        def matches(core: str, title: str) -> bool:
            if franchise and core.lower().startswith(franchise.lower()):
                return True
            return bool(genres) and _genre(title) == genres.most_common(1)[0][0]

        pool = [c for c, t in zip(cores, recent_first) if matches(c, t)] or cores
        pool = list(dict.fromkeys(_short(c) for c in pool))
        n_ex = 1 + self._h(key, "n_examples", 2) if len(pool) > 1 else 1
        return _join(pool[:n_ex])

    # -- I1 -------------------------------------------------------------------------------
    def _cue(self, key: str, text: str) -> str:
        m = _RECIPIENT_RE.search(text)
        if m:
            return f"a gift for my {m.group(1).lower()}"
        if _SOCIAL_RE.search(text):
            return "something to play with friends"
        found = [q for rx, q in _QUALITIES if re.search(rx, text, re.I)]
        if found:
            found = list(dict.fromkeys(found))[:2]
            return "something " + _join(found)
        return ""

    def _vague(self, r: AnnotationRequest) -> str | None:
        full = _clean(r.target_title)
        leak = [full, _core(r.target_title), r.target_title, *_title_heads(full)]
        review = _clean(r.target_review)
        description = _clean(r.target_description)
        if review or description:
            source = review or description
            s = _scrub(_first_sentence(source), leak)
            slots = {"S": s, "s": _lower_first(s), "cue": self._cue(r.key(), source)}
            text = self._choose(r.key(), "vague", VAGUE_REVIEW if review else VAGUE_DESCRIPTION, slots)
        else:
            text = self._choose(r.key(), "vague-title", *self._title_slots(r))
        return _scrub(text, leak) if text else None

    def _title_slots(self, r: AnnotationRequest) -> tuple[list[Frame], dict[str, str], int]:
        """The frames and slots of a vague intention from the target's title alone (and its
        categories): its genre, accessory kind, categories, a few of its words (never all), its
        platform, a tone, and a genre it is not."""
        key, full, core = r.key(), _clean(r.target_title), _core(r.target_title)
        genre, acc = _genre(full), _accessory(full)
        cats = [c for c in r.target_categories if c and c.strip()]
        cat_phrase = _join([c.lower() if not c.isupper() else c for c in cats[-2:]]) if cats else ""
        content = [w for w in _words(core) if w.lower().strip(".:'") not in _STOP and not w.isdigit()
                   and w.lower() not in _PLATFORM_WORDS and len(w) > 2]
        word_phrase = ""
        if len(content) >= 2:  # never all of them: at most len-1 (and at most two) title words
            n = min(len(content) - 1, 1 + self._h(key, "nwords", 2))
            start = self._h(key, "wstart", len(content) - n + 1)
            word_phrase = " ".join(w.lower() for w in content[start : start + n])
        slots = {"G": genre or "", "aG": _an(genre) if genre else "", "A": acc or "", "C": cat_phrase, "W": word_phrase,
                 "P": platform_of(r.target_title) or "", "T": self._tone(key, genre)}
        if acc:  # an accessory's genre words ("racing wheel") are not what the user wants to play
            slots["G"] = slots["aG"] = slots["T"] = ""
        if slots["G"]:  # from the target alone: an intention's answer is cached by its target
            slots["N"] = self._other_genre(key, {genre})
        frames = list(VAGUE_TITLE)
        if slots["A"] or slots["G"] or slots["C"]:  # a few title words only as a last resort
            frames = [f for f in frames if f.needs != ("W",)]
        return frames, slots, 1

    # -- I2 -------------------------------------------------------------------------------
    def _specific(self, r: AnnotationRequest) -> str | None:
        fs = facets(r.target_title, r.target_categories)
        if not fs:
            return None
        key = r.key()
        platform = platform_of(r.target_title)
        cats = [f for f in fs if f != platform]
        acc = _accessory(r.target_title)
        noun = acc or "game"
        slots = {
            "P": platform or "",
            "n": noun,
            "ns": _plural(noun),
            "a": _an(noun).split(" ", 1)[0],
            "c": cats[-1] if cats else "",
            "ac": _an(cats[-1]) if cats else "",
            "cs": ", ".join(cats),
            "cand": " and ".join(cats[-2:]) if cats else "",
            "all": ", ".join(fs),
        }
        slots["looking"] = (f"Looking for {slots['a']} {noun} for {platform}." if acc
                            else f"Looking for something to play on {platform}.")
        frames = SPECIFIC_CATEGORY if not platform else SPECIFIC_PLATFORM_CATEGORY if cats else SPECIFIC_PLATFORM
        return self._choose(key, "specific", frames, slots)


# --- P2 phrases (each from the history alone) ----------------------------------------------------


def _platform_phrase(titles: list[str]) -> tuple[str, Counter]:
    """The one or two platforms the history is mostly on, and the count per platform."""
    plats = Counter(p for p in (platform_of(t) for t in titles) if p)
    if not plats:
        return "", plats
    total = sum(plats.values())
    top = [p for p, c in plats.most_common(3) if c >= 2 or (c == total and len(titles) <= 2)]
    top = [p for p in top if plats[p] / total >= 0.25][:2]
    return _join(top), plats


def _franchise(cores: list[str]) -> str:
    """The longest leading word sequence (1-3 words) shared by two distinct titles, or ""."""
    seqs: Counter[str] = Counter()
    display: dict[str, str] = {}
    for core in dict.fromkeys(cores):
        ws = [w.strip(":,!.") for w in core.split()]
        for n in (1, 2, 3):
            if len(ws) < n:
                break
            head = ws[:n]
            if any(re.fullmatch(r"\d+|[ivx]+", w.lower()) for w in head):
                break
            low = " ".join(head).lower()
            seqs[low] += 1
            display.setdefault(low, " ".join(head))
    best = [(len(s.split()), c, s) for s, c in seqs.items() if c >= 2
            and not all(w in _STOP or w in _PLATFORM_WORDS for w in s.split())
            and not (len(s.split()) == 1 and len(s) < 4) and platform_of("x - " + s) is None]
    if not best:
        return ""
    best.sort(key=lambda x: (x[0], x[1]), reverse=True)
    return display[best[0][2]]


def _genre_phrase(titles: list[str]) -> tuple[str, Counter]:
    """The history's one or two main genres from the title lexicon, and the count per genre."""
    genres = Counter(g for g in (_genre(t) for t in titles) if g)
    if not genres:
        return "", genres
    top = [g for g, c in genres.most_common(2) if c >= 2 or c / len(titles) >= 0.4]
    return _join(top), genres


def _category_phrase(history_categories, plats: Counter) -> str:
    """The two commonest categories of the history (a shared root category and platforms left out)."""
    cat_lists = [tuple(c for c in cs if c) for cs in history_categories]
    if not any(cat_lists):
        return ""
    non_empty = [cs for cs in cat_lists if cs]
    roots = {cs[0] for cs in non_empty}
    skip = roots if len(roots) == 1 and all(len(cs) > 1 for cs in non_empty) else set()
    cats = Counter(c for cs in non_empty for c in dict.fromkeys(cs) if c not in skip and c not in plats)
    if not cats:
        return ""
    return _join([c.lower() if c[:1].isupper() and not c.isupper() else c for c, _ in cats.most_common(2)])
