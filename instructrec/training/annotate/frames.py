"""The offline teacher's sentence frames, each a named phrasing family.

A frame names the slots it needs (all non-empty) and the sentence it writes. Its family is
``GROUP.NAME``: the group is the situation it serves (what the request offers: a platform, a
franchise, a review, ...), so that the split into training and held-out families
(:mod:`instructrec.training.annotate.phrasing`) can leave every situation phrasable on both
sides. Frames marked ``new`` came with the second teacher version (``offline-v2``); the others
are exactly the ones ``offline-v1`` chose from, in the same order (order matters: the choice
is a hash modulo the pool). A group ending in ``-compose`` or ``-negation`` is a generator
style the teacher draws first with a fixed chance, not a plain frame.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Frame:
    family: str
    needs: tuple[str, ...]
    text: str
    new: bool = False

    @property
    def group(self) -> str:
        return self.family.split(".", 1)[0]

    @property
    def styled(self) -> bool:
        """A compositional or negating generator style rather than a plain paraphrase."""
        return self.group.endswith(("-compose", "-negation"))


def _frames(rows, new: bool = False) -> tuple[Frame, ...]:
    return tuple(Frame(family, needs, text, new) for family, needs, text in rows)


# -- P2: explicit preference, from the history ---------------------------------------------------
# slots: P platforms, aP "a"/"an" + P, G genres, F franchise, TF "the" + F, E example titles,
# C categories, A accessories; new: N a genre the history lacks, T the tone of the main genre.
PREFERENCE = _frames((
    ("pref-platform.mostly-such-as", ("P", "G", "E"), "I mostly play on {P} and like {G} games such as {E}."),
    ("pref-platform.most-of-my", ("P", "G", "E"), "Most of my gaming is on {P}, usually {G} games like {E}."),
    ("pref-platform.player-who", ("P", "aP", "G"), "I'm {aP} player who enjoys {G} games."),
    ("pref-platform.give-me", ("P", "G"), "Give me {G} games on {P} and I'm happy."),
    ("pref-genre.tend-to", ("G", "E"), "I tend to go for {G} games; {E} is the kind of thing I like."),
    ("pref-genre.really-enjoy", ("G", "E"), "I really enjoy {G} games, for example {E}."),
    ("pref-franchise.big-fan", ("F", "TF", "P"), "I'm a big fan of {TF} series, mostly on {P}."),
    ("pref-franchise.next-one", ("F", "P"), "I play on {P} and always pick up the next {F}."),
    ("pref-franchise.follow", ("F", "P", "G"), "I follow {F} closely and generally like {G} games on {P}."),
    ("pref-franchise.above-all", ("F", "P", "G"), "On {P} I go for {G} games, {F} above all."),
    ("pref-franchise.love-and", ("F", "G"), "I love {F} and {G} games in general."),
    ("pref-franchise.my-thing", ("F", "G"), "{G} games are my thing, especially {F}."),
    ("pref-franchise.drawn-to", ("F", "G"), "I'm drawn to {G} games; {F} is a favourite."),
    ("pref-franchise.coming-back-loved", ("F", "E"), "I keep coming back to {F}; I loved {E}."),
    ("pref-franchise.catches-eye-like", ("F", "E"), "Anything from {F} catches my eye, like {E}."),
    ("pref-franchise.catches-eye", ("F",), "Anything from {F} catches my eye."),
    ("pref-franchise.coming-back", ("F",), "I keep coming back to {F}."),
    ("pref-genre.really-into", ("G",), "I'm really into {G} games."),
    ("pref-genre.favourite-kind", ("G",), "My favourite kind of game is {G}."),
    ("pref-platform.keep-up", ("P",), "I mostly play on {P} and like to keep up with what's new there."),
    ("pref-platform.lately", ("P", "E"), "I play on {P}; lately I liked {E}."),
    ("pref-platform.happens-on", ("P", "E"), "Most of my gaming happens on {P}; I enjoyed {E} a lot."),
    ("pref-example.in-that-vein", ("E",), "I've enjoyed things like {E} and want more in that vein."),
    ("pref-example.similar-picks", ("E",), "Recently I liked {E}, so similar picks suit me."),
    ("pref-category.into", ("C",), "I'm into {C}."),
    ("pref-category.taste-runs", ("C",), "My taste runs to {C}."),
    ("pref-category.for-example", ("C", "E"), "I like {C}, for example {E}."),
    ("pref-category.mostly", ("C", "E"), "Mostly {C} for me; favourites include {E}."),
    ("pref-gear.buy-a-lot", ("A",), "I buy a lot of gaming gear, like {A}."),
)) + _frames((
    ("pref-example.same-lines", ("E",), "I've been playing {E} and want something along the same lines."),
    ("pref-example.more-like", ("E",), "More games in the spirit of {E} would suit me."),
    ("pref-platform.my-console", ("P", "G"), "My console is {P}, and {G} games are what I reach for."),
    ("pref-platform.setup", ("P",), "Whatever I buy has to run on {P}."),
    ("pref-genre.go-to", ("G",), "{G} games are my go-to."),
    ("pref-genre.never-tire", ("G", "E"), "I never get tired of {G} games; think {E}."),
    ("pref-franchise.every-entry", ("F", "TF", "P"), "I've played every entry of {TF} series I could get on {P}."),
    ("pref-compose.list", ("G", "T", "P"), "{G}, {T}, on {P}."),
    ("pref-compose.looking-for", ("G", "T", "E"), "What I look for: {G}, {T}, a bit like {E}."),
    ("pref-negation.no-thanks", ("G", "N"), "{G} games, yes; {N} games, no thanks."),
    ("pref-negation.not-for-me", ("E", "N"), "Games like {E} are for me; {N} games are not."),
), new=True)

# -- I1: vague intention -------------------------------------------------------------------------
# From a review: S its first sentence (scrubbed of the title), s the same lower-cased, cue
# ("a gift for my son"). From a description: the same slots.
VAGUE_REVIEW = _frames((
    ("vague-review.looking-for-cue", ("cue", "S"), "I'm looking for {cue}. {S}"),
    ("vague-review.so-i-want", ("cue", "S"), "{S} So I want {cue}."),
    ("vague-review.need-cue", ("cue", "s"), "I need {cue}; {s}"),
    ("vague-review.kind-of-thing", ("S",), "{S} That's the kind of thing I'm after."),
    ("vague-review.what-im-after", ("s",), "What I'm after: {s}"),
    ("vague-review.hoping-for", ("s",), "Hoping for something like this: {s}"),
)) + _frames((
    ("vague-review.friend-said", ("s",), "A friend told me about a game where {s}"),
    ("vague-review.sounds-right", ("cue", "S"), "{S} Sounds like {cue}, and that is what I need."),
), new=True)

VAGUE_DESCRIPTION = _frames((
    ("vague-description.along-these-lines", ("cue", "s"), "I'd like {cue}, along these lines: {s}"),
    ("vague-description.sounds-like-cue", ("cue", "S"), "{S} That sounds like {cue}, which is what I want."),
    ("vague-description.in-the-mood", ("s",), "I'm in the mood for something like this: {s}"),
    ("vague-description.right-now", ("S",), "{S} That sounds like what I want right now."),
    ("vague-description.my-idea", ("s",), "Something where {s} That's my idea."),
)) + _frames((
    ("vague-description.blurb", ("S",), "I read a blurb once: \"{S}\" Something like that."),
), new=True)

# From the title alone (Games): G/aG genre, A accessory, C categories, W a few title words;
# new: P the target's platform, T the tone of its genre, N a genre it is not.
VAGUE_TITLE = _frames((
    ("vague-genre.feel-like", ("G", "aG"), "I feel like playing {aG} game."),
    ("vague-genre.good-one", ("G",), "I'm in the mood for a good {G} game."),
    ("vague-genre.with-words", ("G", "aG", "W"), "I feel like playing {aG} game, maybe something with {W} in it."),
    ("vague-gear.new-for-setup", ("A",), "I need a new {A} for my setup."),
    ("vague-gear.worn-out", ("A",), "My old {A} is worn out, so I need a replacement."),
    ("vague-category.in-the-mood", ("C",), "I'm in the mood for something {C}."),
    ("vague-category.in-the-line", ("C",), "Something in the {C} line would be nice."),
    ("vague-category.involving", ("C", "W"), "I want something {C}, perhaps involving {W}."),
    ("vague-words.with-in-it", ("W",), "I want something with {W} in it."),
    ("vague-words.involving", ("W",), "I'm thinking about something involving {W}."),
)) + _frames((
    ("vague-genre.craving", ("G", "aG"), "I'm craving {aG} game tonight."),
    ("vague-genre.worth-evening", ("G",), "Got any {G} games worth an evening?"),
    ("vague-gear.upgrade", ("A",), "Time to upgrade my {A}."),
    ("vague-words.cant-recall", ("W",), "There's a game with {W} in it that I can't stop thinking about."),
    ("vague-compose.list", ("G", "T", "P"), "{G}, {T}, for {P}."),
    ("vague-compose.ask", ("aG", "T", "P"), "Find me {aG} game for {P}, ideally {T}."),
    ("vague-compose.gear", ("A", "P"), "A {A} that works with my {P}."),
    ("vague-negation.had-my-fill", ("aG", "N"), "I've had my fill of {N} games for now; {aG} game would be a nice change."),
    ("vague-negation.but-no", ("G", "N"), "Something {G}, but no {N} games."),
), new=True)

# -- I2: specific intention (a search query) -----------------------------------------------------
# P platform, n/ns/a the noun ("game", an accessory) and its plural and article; c/ac the last
# category (with its article), cs/cand the categories, all = platform and categories.
SPECIFIC_PLATFORM = _frames((
    ("spec-platform.noun-for", ("P",), "{a} {n} for {P}"),
    ("spec-platform.plural", ("P",), "{P} {ns}"),
    ("spec-platform.looking", ("P",), "{looking}"),
    ("spec-platform.need-new", ("P",), "I need a new {P} {n}."),
    ("spec-platform.show-me", ("P",), "Show me {ns} for {P}."),
)) + _frames((
    ("spec-platform.anything-good", ("P",), "Anything good on {P}?"),
    ("spec-platform.what-to-get", ("P",), "What {n} should I get for my {P}?"),
), new=True)

SPECIFIC_PLATFORM_CATEGORY = _frames((
    ("spec-platform-category.in-category", ("P", "c"), "Looking for something on {P} in the {c} category."),
    ("spec-platform-category.all", ("all",), "{all}"),
    ("spec-platform-category.want", ("P", "c"), "I want {ac} {n} for {P}."),
    ("spec-platform-category.pair", ("P", "cand"), "{P}, {cand}"),
)) + _frames((
    ("spec-platform-category.please", ("P", "c"), "{c} on {P}, please."),
), new=True)

SPECIFIC_CATEGORY = _frames((
    ("spec-category.list", ("cs",), "{cs}"),
    ("spec-category.looking", ("c",), "Looking for something in the {c} category."),
    ("spec-category.please", ("cand",), "Something in {cand}, please."),
    ("spec-category.tagged", ("cand",), "I'd like something tagged {cand}."),
)) + _frames((
    ("spec-category.browsing", ("cand",), "Browsing {cand} today."),
), new=True)

ALL_FRAMES: tuple[Frame, ...] = (PREFERENCE + VAGUE_REVIEW + VAGUE_DESCRIPTION + VAGUE_TITLE + SPECIFIC_PLATFORM
                                 + SPECIFIC_PLATFORM_CATEGORY + SPECIFIC_CATEGORY)
