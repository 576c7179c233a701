"""Generate the toy theatre-review sentiment set (train.jsonl / eval.jsonl).

Every row is {"text": "...", "label": "positive" | "negative"}: one or two
short sentences (8-25 words) about a performance of a play. The sentences are
built from templates and word lists below, so the data is synthetic and carries
no third-party licence. Deterministic (random.Random(7)), stdlib only:

    python examples/data/reviews/make_reviews.py

writes train.jsonl (1200 rows) and eval.jsonl (300 rows) next to this file.
Both splits are balanced 50/50 and shuffled, and no text appears twice, within
or across the two files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 7
N_TRAIN = 1200
N_EVAL = 300
MIN_WORDS, MAX_WORDS = 8, 25
MAX_FILE_BYTES = 150_000

# ---------------------------------------------------------------- vocabulary
# Play title -> a few characters. Used for flavour in both classes.
PLAYS = {
    "Hamlet": ["Hamlet", "Ophelia", "Gertrude", "Claudius", "Polonius", "Horatio"],
    "Macbeth": ["Macbeth", "Lady Macbeth", "Banquo", "Macduff"],
    "Romeo and Juliet": ["Romeo", "Juliet", "Mercutio", "the Nurse", "Tybalt"],
    "King Lear": ["Lear", "Cordelia", "Goneril", "the Fool", "Edmund"],
    "Twelfth Night": ["Viola", "Malvolio", "Olivia", "Feste", "Sir Toby"],
    "A Midsummer Night's Dream": ["Puck", "Bottom", "Titania", "Oberon", "Helena"],
    "The Tempest": ["Prospero", "Ariel", "Caliban", "Miranda"],
    "Othello": ["Othello", "Iago", "Desdemona", "Emilia"],
    "Much Ado About Nothing": ["Beatrice", "Benedick", "Dogberry", "Hero"],
    "As You Like It": ["Rosalind", "Jaques", "Orlando", "Touchstone"],
    "The Merchant of Venice": ["Shylock", "Portia", "Antonio", "Bassanio"],
    "Julius Caesar": ["Brutus", "Cassius", "Mark Antony", "Caesar"],
    "The Winter's Tale": ["Leontes", "Hermione", "Paulina", "Perdita"],
    "Richard III": ["Richard", "Queen Margaret", "Buckingham"],
}
SCENES = {
    "Hamlet": ["the graveyard scene", "the play within the play", "the closet scene"],
    "Macbeth": ["the dagger speech", "the sleepwalking scene", "the banquet scene"],
    "Romeo and Juliet": ["the balcony scene", "the tomb scene", "the street brawl"],
    "King Lear": ["the storm scene", "the reunion with Cordelia", "the opening division of the kingdom"],
    "Twelfth Night": ["the letter scene", "the final recognition scene"],
    "A Midsummer Night's Dream": ["the mechanicals' play", "the quarrel in the forest"],
    "The Tempest": ["the masque", "the shipwreck", "Prospero's farewell"],
    "Othello": ["the handkerchief scene", "the final bedroom scene"],
    "Much Ado About Nothing": ["the wedding scene", "the gulling scenes"],
    "Julius Caesar": ["the funeral orations", "the assassination"],
}
FIRST = [
    "Ada",
    "Tom",
    "Priya",
    "Jonah",
    "Maya",
    "Felix",
    "Grace",
    "Omar",
    "Lena",
    "Samuel",
    "Iris",
    "Kwame",
    "Nora",
    "Theo",
    "Rosa",
    "Hugo",
    "Clara",
    "Dev",
    "Elsa",
    "Marcus",
    "June",
    "Rafael",
    "Aisha",
    "Callum",
]
LAST = [
    "Whitlock",
    "Okafor",
    "Brennan",
    "Castillo",
    "Hale",
    "Moreau",
    "Lindqvist",
    "Achebe",
    "Sharma",
    "Fairbairn",
    "Novak",
    "Delacroix",
    "Pryce",
    "Tanaka",
    "Greaves",
    "Mbeki",
    "Ashworth",
    "Quinn",
    "Varga",
    "Holloway",
]
VENUES = [
    "the Globe",
    "the Rose Street Playhouse",
    "the Old Vic",
    "the Lyric",
    "the Riverside Theatre",
    "the Court Theatre",
    "the Swan",
    "the Playhouse",
    "the little studio theatre",
    "the open-air theatre in the park",
]
PROD_KINDS = [
    "production",
    "revival",
    "staging",
    "touring production",
    "modern-dress production",
    "new production",
    "open-air staging",
]

# Subjects: (text, plural?). Performers can take acting-specific verb phrases.
PERFORMERS = [
    ("the actors", True),
    ("the cast", False),
    ("the ensemble", False),
    ("the lead", False),
    ("the supporting cast", False),
    ("the young lead", False),
    ("the chorus", False),
    ("the two leads", True),
    ("the comic actors", True),
]
ELEMENTS = [
    ("the staging", False),
    ("the set design", False),
    ("the costumes", True),
    ("the director", False),
    ("the lighting", False),
    ("the second act", False),
    ("the first act", False),
    ("the music", False),
    ("the score", False),
    ("the choreography", False),
    ("the sword fights", True),
    ("the pacing", False),
    ("the sound design", False),
    ("the final scene", False),
    ("the opening scene", False),
    ("the verse speaking", False),
    ("the live band", False),
    ("the projections", True),
    ("the scenery", False),
    ("the ending", False),
]
ALL_SUBJECTS = PERFORMERS + ELEMENTS

POS = {
    "adj": [
        "brilliant",
        "superb",
        "captivating",
        "dazzling",
        "moving",
        "electrifying",
        "gorgeous",
        "inventive",
        "radiant",
        "masterful",
        "luminous",
        "heartfelt",
        "witty",
        "spellbinding",
        "polished",
        "vibrant",
        "stunning",
        "delightful",
        "powerful",
        "exquisite",
        "riveting",
        "assured",
        "tender",
        "elegant",
        "thrilling",
        "charming",
        "magnificent",
        "fresh",
        "glorious",
        "sublime",
    ],
    "adv": [
        "beautifully",
        "wonderfully",
        "thrillingly",
        "superbly",
        "gloriously",
        "delightfully",
        "richly",
        "genuinely",
        "simply",
        "utterly",
        "remarkably",
        "consistently",
        "truly",
    ],
    "vp": [
        "lit up the stage",
        "held the audience spellbound",
        "soared from start to finish",
        "brought real warmth to every scene",
        "carried the whole evening",
        "drew gasps from the audience",
        "earned a standing ovation",
        "kept the tension taut until the very end",
        "sparkled all night",
        "gave the old story a thrilling new energy",
        "made three hours fly by",
        "filled the theatre with magic",
        "added a lovely sense of wonder",
        "set exactly the right mood",
        "built to a stunning climax",
    ],
    "vp_actor": [
        "made every line sing",
        "found new depth in the old verse",
        "moved half the audience to tears",
        "delivered every speech with clarity and fire",
        "handled the verse with real grace",
        "had the crowd roaring with laughter",
        "played every moment with total conviction",
        "owned the stage",
    ],
    "verdict": [
        "an absolute triumph",
        "a joy from start to finish",
        "the best night out I have had all year",
        "a must-see",
        "a real treat",
        "a production to treasure",
        "theatre at its finest",
        "a glorious evening",
        "a wonderful surprise",
        "pure pleasure",
        "an unforgettable night",
    ],
    "feeling": [
        "delighted",
        "deeply moved",
        "elated",
        "grinning",
        "inspired",
        "enchanted",
        "thrilled",
        "uplifted",
        "glowing",
    ],
    "extra": [
        "The audience rose to its feet at the curtain call.",
        "The crowd cheered long after the final bow.",
        "Book early, because this one will sell out.",
        "Go and see it twice.",
        "Buy a ticket while you still can.",
        "I would happily see it again tomorrow.",
        "Every seat deserved to be full.",
        "Bravo to everyone involved.",
        "It is a gift to the city.",
        "The applause went on for minutes.",
    ],
    "open": [
        "What a night!",
        "Bravo!",
        "Simply wonderful.",
        "What a treat.",
        "Pure magic.",
        "A triumph.",
        "Believe the hype.",
    ],
    "scene_adj": [
        "tender and spellbinding",
        "thrilling and precise",
        "funny and moving",
        "beautifully judged",
        "electric",
        "heartbreaking in the best way",
    ],
    "noun": ["energy", "warmth", "wit", "grace", "precision", "passion", "flair", "charm"],
}
NEG = {
    "adj": [
        "dull",
        "clumsy",
        "tedious",
        "flat",
        "lifeless",
        "sloppy",
        "wooden",
        "muddled",
        "tiresome",
        "shrill",
        "leaden",
        "awkward",
        "forgettable",
        "garish",
        "incoherent",
        "stiff",
        "plodding",
        "dreary",
        "grating",
        "bland",
        "confused",
        "lacklustre",
        "hollow",
        "messy",
        "disappointing",
        "amateurish",
        "cheap",
        "monotonous",
        "overwrought",
        "sluggish",
    ],
    "adv": [
        "painfully",
        "dreadfully",
        "woefully",
        "hopelessly",
        "tediously",
        "frustratingly",
        "embarrassingly",
        "simply",
        "utterly",
        "remarkably",
        "consistently",
        "truly",
        "terribly",
    ],
    "vp": [
        "dragged on and on",
        "drained the life from every scene",
        "left the audience restless",
        "fell apart after the interval",
        "smothered the poetry",
        "drew yawns from the audience",
        "sent people home at the interval",
        "turned the tragedy into a farce",
        "made three hours feel like six",
        "clashed with everything else on stage",
        "lost the thread completely",
        "killed the mood",
        "distracted from the story at every turn",
        "felt like a chore",
        "sank into a muddle by the end",
    ],
    "vp_actor": [
        "mumbled through the finest speeches",
        "rushed every line",
        "shouted the verse at us",
        "seemed lost on the stage",
        "forgot lines more than once",
        "played everything at one dreary pitch",
        "mugged shamelessly for laughs",
        "sleepwalked through the evening",
    ],
    "verdict": [
        "a long and weary evening",
        "a disappointing mess",
        "the weakest production I have seen all year",
        "a chore to sit through",
        "a missed opportunity",
        "a muddle from start to finish",
        "an evening to forget",
        "a dreary slog",
        "a complete letdown",
        "a waste of a good play",
        "a tiresome ordeal",
    ],
    "feeling": [
        "bored",
        "irritated",
        "exhausted",
        "baffled",
        "disappointed",
        "restless",
        "annoyed",
        "glum",
        "deflated",
    ],
    "extra": [
        "Half the audience left at the interval.",
        "The applause at the end was thin and polite.",
        "Save your money and stay home.",
        "Skip this one and read the play instead.",
        "Wait for a better revival.",
        "I checked my watch every ten minutes.",
        "The seats were more comfortable than the show.",
        "What a waste of an evening.",
        "People around me were yawning.",
        "I wanted my money back.",
    ],
    "open": [
        "What a letdown.",
        "Oh dear.",
        "Such a shame.",
        "What a mess.",
        "Avoid.",
        "A real disappointment.",
        "Dreadful.",
    ],
    "scene_adj": [
        "rushed and lifeless",
        "clumsy and confused",
        "oddly flat",
        "painfully slow",
        "awkward and stiff",
        "a shapeless mess",
    ],
    "noun": ["confusion", "fatigue", "clumsiness", "indifference", "carelessness", "strain"],
}


# ------------------------------------------------------------------ helpers
def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def a_an(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


class Gen:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, seq):
        return self.rng.choice(seq)

    def actor(self) -> str:
        return f"{self.pick(FIRST)} {self.pick(LAST)}"

    def play(self) -> str:
        return self.pick(list(PLAYS))

    def prod(self) -> str:
        """A reference to the show: 'this revival of Hamlet', 'the play', ..."""
        r = self.rng.random()
        if r < 0.55:
            return f"this {self.pick(PROD_KINDS)} of {self.play()}"
        if r < 0.8:
            return f"{self.play()} at {self.pick(VENUES)}"
        return self.pick(["the play", "tonight's show", "the new revival", "this staging"])

    def subject(self, performers_only: bool = False):
        return self.pick(PERFORMERS if performers_only else ALL_SUBJECTS)

    def adv_for(self, v, adj: str) -> str:
        """An adverb that does not echo the adjective ('delightfully delightful')."""
        while True:
            adv = self.pick(v["adv"])
            if adv[:5] != adj[:5]:
                return adv

    def maybe_in(self) -> str:
        return f" in {self.prod()}" if self.rng.random() < 0.5 else ""

    # ---- templates; each takes the vocabulary of one class
    def t_was_adj(self, v):
        subj, plural = self.subject()
        be = "were" if plural else "was"
        adj = self.pick(v["adj"])
        s = f"{cap(subj)}{self.maybe_in()} {be} {self.adv_for(v, adj)} {adj}."
        return s + (" " + self.pick(v["extra"]) if self.rng.random() < 0.5 else "")

    def t_vp(self, v):
        performer = self.rng.random() < 0.4
        subj, _ = self.subject(performers_only=performer)
        vp = self.pick(v["vp_actor"] if performer else v["vp"])
        return f"{cap(subj)}{self.maybe_in()} {vp}."

    def t_as_character(self, v):
        play = self.play()
        char = self.pick(PLAYS[play])
        vp = self.pick(v["vp_actor"])
        tail = f" in {play}" if self.rng.random() < 0.5 and char != play else ""
        return f"As {char}{tail}, {self.actor()} {vp}."

    def t_possessive(self, v):
        play = self.play()
        char = self.pick(PLAYS[play])
        a1, a2 = self.rng.sample(v["adj"], 2)
        return f"{self.actor()}'s {char} was {self.adv_for(v, a1)} {a1} and {a2}. {self.pick(v['extra'])}"

    def t_verdict(self, v):
        return f"{cap(self.prod())} was {self.pick(v['verdict'])}."

    def t_feeling(self, v):
        venue = self.pick(VENUES)
        return f"I left {venue} feeling {self.pick(v['feeling'])} after {self.prod()}."

    def t_pair(self, v):
        (s1, p1), (s2, p2) = self.rng.sample(ALL_SUBJECTS, 2)
        a1, a2 = self.rng.sample(v["adj"], 2)
        return f"{cap(s1)} {'were' if p1 else 'was'} {a1} and {s2} {'were' if p2 else 'was'} {a2}."

    def t_two_vps(self, v):
        (s1, _), (s2, _) = self.rng.sample(ELEMENTS, 2)
        vp1, vp2 = self.rng.sample(v["vp"], 2)
        return f"{cap(s1)} {vp1}, and {s2} {vp2}."

    def t_open(self, v):
        subj, plural = self.subject()
        return (
            f"{self.pick(v['open'])} {cap(subj)} in {self.prod()} "
            f"{'were' if plural else 'was'} {self.pick(v['adj'])}."
        )

    def t_first_to_last(self, v):
        a1, a2 = self.rng.sample(v["adj"], 2)
        lead = self.pick(
            [
                "From the opening scene to the final bow",
                "From start to finish",
                "All evening long",
                "From the first line to the last",
            ]
        )
        return f"{lead}, {self.prod()} was {a1} and {a2}."

    def t_scene(self, v):
        play = self.pick(list(SCENES))
        scene = self.pick(SCENES[play])
        return f"In this {self.pick(PROD_KINDS)} of {play}, {scene} was {self.pick(v['scene_adj'])}."

    def t_adj_play(self, v):
        adj = self.pick(v["adj"])
        return f"This {adj} {self.play()} {self.pick(v['vp'])}. {self.pick(v['extra'])}"

    def t_director(self, v):
        who = self.pick(["The director", f"The director, {self.actor()},", "The designer", "The company"])
        noun = self.pick(v["noun"])
        return f"{who} staged {self.play()} with {noun}, and the result was {self.pick(v['verdict'])}."

    def t_noun(self, v):
        subj, _ = self.subject(performers_only=True)
        n1, n2 = self.rng.sample(v["noun"], 2)
        return f"{cap(subj)} played {self.prod()} with {n1} and {n2} throughout."

    TEMPLATES = [
        t_was_adj,
        t_vp,
        t_as_character,
        t_possessive,
        t_verdict,
        t_feeling,
        t_pair,
        t_two_vps,
        t_open,
        t_first_to_last,
        t_scene,
        t_adj_play,
        t_director,
        t_noun,
    ]

    def sentence(self, label: str) -> str:
        vocab = POS if label == "positive" else NEG
        while True:
            tmpl = self.pick(self.TEMPLATES)
            text = tmpl(self, vocab)
            if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                return text


def main() -> None:
    rng = random.Random(SEED)
    gen = Gen(rng)
    per_class = (N_TRAIN + N_EVAL) // 2
    seen: set[str] = set()
    pools: dict[str, list[str]] = {"positive": [], "negative": []}
    for label in ("positive", "negative"):
        while len(pools[label]) < per_class:
            text = gen.sentence(label)
            key = text.lower()
            if key not in seen:  # dedupe within and across classes / splits
                seen.add(key)
                pools[label].append(text)

    n_eval_class = N_EVAL // 2
    splits = {"eval": [], "train": []}
    for label, texts in pools.items():
        rng.shuffle(texts)
        splits["eval"] += [{"text": t, "label": label} for t in texts[:n_eval_class]]
        splits["train"] += [{"text": t, "label": label} for t in texts[n_eval_class:]]

    for name, rows in splits.items():
        rng.shuffle(rows)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        assert len(body.encode("utf-8")) < MAX_FILE_BYTES, (name, len(body))
        (HERE / f"{name}.jsonl").write_text(body, encoding="utf-8", newline="\n")
        print(f"{name}.jsonl: {len(rows)} rows, {len(body.encode('utf-8'))} bytes")
    assert not ({r["text"] for r in splits["train"]} & {r["text"] for r in splits["eval"]})


if __name__ == "__main__":
    main()
