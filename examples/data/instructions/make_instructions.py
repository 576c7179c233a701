"""Generate the toy instruction-tuning set (train.jsonl / eval.jsonl).

Every row is {"prompt": "...", "response": "..."}: short templated tasks that a
tiny causal LM can partly learn with supervised fine-tuning (who wrote a play,
which play a character is from, antonyms, plurals, repeat / reverse / uppercase
a phrase, small sums, the next weekday or month, completing famous lines).
The data is synthetic and carries no third-party licence. Deterministic
(random.Random(7)), stdlib only:

    python examples/data/instructions/make_instructions.py

writes train.jsonl (600 rows) and eval.jsonl (100 rows) next to this file.
No prompt appears twice, within or across the two files, so eval measures
whether the model learned the *pattern* (e.g. an unseen play title).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 7
N_TRAIN = 600
N_EVAL = 100
MAX_FILE_BYTES = 60_000

SHAKESPEARE_PLAYS = [
    "Hamlet",
    "Macbeth",
    "Othello",
    "King Lear",
    "Romeo and Juliet",
    "The Tempest",
    "Twelfth Night",
    "A Midsummer Night's Dream",
    "Much Ado About Nothing",
    "As You Like It",
    "The Merchant of Venice",
    "Julius Caesar",
    "Antony and Cleopatra",
    "Coriolanus",
    "Cymbeline",
    "Pericles",
    "Timon of Athens",
    "Titus Andronicus",
    "The Winter's Tale",
    "The Taming of the Shrew",
    "The Comedy of Errors",
    "Love's Labour's Lost",
    "Measure for Measure",
    "All's Well That Ends Well",
    "Troilus and Cressida",
    "The Two Gentlemen of Verona",
    "The Merry Wives of Windsor",
    "Richard II",
    "Richard III",
    "Henry V",
    "Henry VIII",
    "King John",
]
OTHER_WORKS = {
    "Paradise Lost": "John Milton",
    "Pride and Prejudice": "Jane Austen",
    "Emma": "Jane Austen",
    "Oliver Twist": "Charles Dickens",
    "Great Expectations": "Charles Dickens",
    "Moby-Dick": "Herman Melville",
    "Frankenstein": "Mary Shelley",
    "Jane Eyre": "Charlotte Bronte",
    "Wuthering Heights": "Emily Bronte",
    "Doctor Faustus": "Christopher Marlowe",
    "The Canterbury Tales": "Geoffrey Chaucer",
    "Don Quixote": "Miguel de Cervantes",
    "Gulliver's Travels": "Jonathan Swift",
    "Robinson Crusoe": "Daniel Defoe",
    "The Odyssey": "Homer",
    "Dracula": "Bram Stoker",
}
CHARACTERS = {
    "Hamlet": ["Ophelia", "Polonius", "Horatio", "Laertes", "Claudius", "Gertrude"],
    "Macbeth": ["Lady Macbeth", "Banquo", "Macduff", "Duncan", "Malcolm"],
    "Othello": ["Iago", "Desdemona", "Cassio", "Emilia", "Roderigo"],
    "King Lear": ["Cordelia", "Goneril", "Regan", "Gloucester", "Edgar", "Edmund"],
    "Romeo and Juliet": ["Mercutio", "Tybalt", "Friar Laurence", "Benvolio"],
    "The Tempest": ["Prospero", "Ariel", "Caliban", "Miranda", "Ferdinand"],
    "Twelfth Night": ["Viola", "Malvolio", "Olivia", "Feste", "Sir Toby Belch"],
    "A Midsummer Night's Dream": ["Puck", "Bottom", "Titania", "Oberon", "Hermia"],
    "Much Ado About Nothing": ["Beatrice", "Benedick", "Dogberry"],
    "As You Like It": ["Rosalind", "Orlando", "Jaques", "Touchstone"],
    "The Merchant of Venice": ["Shylock", "Portia", "Bassanio", "Jessica"],
    "Julius Caesar": ["Brutus", "Cassius", "Mark Antony", "Calpurnia"],
    "The Winter's Tale": ["Leontes", "Hermione", "Perdita", "Autolycus"],
    "The Taming of the Shrew": ["Petruchio", "Katherina", "Bianca"],
}
ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("early", "late"),
    ("open", "closed"),
    ("up", "down"),
    ("good", "bad"),
    ("young", "old"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("loud", "quiet"),
    ("full", "empty"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("high", "low"),
    ("long", "short"),
    ("day", "night"),
    ("love", "hate"),
    ("true", "false"),
    ("brave", "cowardly"),
    ("friend", "enemy"),
    ("win", "lose"),
    ("begin", "end"),
    ("push", "pull"),
    ("give", "take"),
    ("laugh", "cry"),
    ("north", "south"),
    ("east", "west"),
    ("heavy", "light"),
    ("clean", "dirty"),
    ("thick", "thin"),
    ("sweet", "bitter"),
    ("war", "peace"),
    ("life", "death"),
    ("king", "queen"),
    ("entrance", "exit"),
    ("comedy", "tragedy"),
    ("above", "below"),
    ("inside", "outside"),
    ("always", "never"),
    ("first", "last"),
    ("wise", "foolish"),
    ("kind", "cruel"),
    ("near", "far"),
    ("buy", "sell"),
    ("arrive", "leave"),
]
PLURALS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("king", "kings"),
    ("play", "plays"),
    ("actor", "actors"),
    ("stage", "stages"),
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("mouse", "mice"),
    ("goose", "geese"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("knife", "knives"),
    ("wife", "wives"),
    ("leaf", "leaves"),
    ("city", "cities"),
    ("story", "stories"),
    ("lady", "ladies"),
    ("box", "boxes"),
    ("church", "churches"),
    ("sword", "swords"),
    ("crown", "crowns"),
    ("witch", "witches"),
    ("ghost", "ghosts"),
    ("sheep", "sheep"),
    ("fish", "fish"),
    ("person", "people"),
    ("glass", "glasses"),
    ("hero", "heroes"),
    ("potato", "potatoes"),
    ("wolf", "wolves"),
    ("scene", "scenes"),
    ("queen", "queens"),
    ("army", "armies"),
    ("kiss", "kisses"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
QUOTES = [
    ("To be, or not to be,", "that is the question."),
    ("All the world's a stage,", "and all the men and women merely players."),
    ("Now is the winter of our discontent", "made glorious summer by this sun of York."),
    ("Friends, Romans, countrymen,", "lend me your ears."),
    ("O Romeo, Romeo!", "wherefore art thou Romeo?"),
    ("If music be the food of love,", "play on."),
    ("The course of true love", "never did run smooth."),
    ("Something is rotten", "in the state of Denmark."),
    ("Double, double toil and trouble;", "fire burn and cauldron bubble."),
    ("A horse! a horse!", "my kingdom for a horse!"),
    ("We are such stuff", "as dreams are made on."),
    ("Parting is such sweet sorrow", "that I shall say good night till it be morrow."),
    ("The lady doth protest", "too much, methinks."),
    ("Lord, what fools", "these mortals be!"),
    ("Out, damned spot!", "out, I say!"),
    ("Once more unto the breach, dear friends,", "once more."),
]
# Word lists for the open-ended phrase tasks (repeat / reverse / uppercase / count).
DETS = ["the", "a", "my", "our", "this", "that"]
ADJS = [
    "quiet",
    "brave",
    "old",
    "golden",
    "gentle",
    "dark",
    "little",
    "proud",
    "green",
    "silver",
    "wild",
    "sleepy",
    "bright",
    "cold",
    "kind",
    "merry",
]
NOUNS = [
    "king",
    "queen",
    "ghost",
    "moon",
    "river",
    "sword",
    "crown",
    "fool",
    "forest",
    "storm",
    "garden",
    "ship",
    "castle",
    "witch",
    "bird",
    "candle",
    "horse",
    "stage",
]
VERBS = [
    "sings",
    "sleeps",
    "waits",
    "falls",
    "rises",
    "dances",
    "weeps",
    "laughs",
    "burns",
    "shines",
    "wanders",
    "speaks",
    "listens",
    "returns",
]
ADVS = [
    "softly",
    "tonight",
    "again",
    "slowly",
    "alone",
    "at dawn",
    "in the rain",
    "by the sea",
    "forever",
    "at last",
]
SPELL_WORDS = sorted(
    {
        w
        for w in NOUNS
        + ADJS
        + [
            "theatre",
            "curtain",
            "actor",
            "poem",
            "sonnet",
            "dream",
            "music",
            "verse",
            "lantern",
            "dagger",
            "letter",
            "island",
        ]
    }
)
NUM_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]


def phrase(rng: random.Random) -> str:
    words = [rng.choice(DETS), rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADVS))
    return " ".join(words)


# ------------------------------------------------------------ task builders
def task_author(rng):
    rows = [(f"Who wrote {p}?", f"William Shakespeare wrote {p}.") for p in SHAKESPEARE_PLAYS]
    rows += [(f"Who wrote {w}?", f"{a} wrote {w}.") for w, a in OTHER_WORKS.items()]
    return rows


def task_character(rng):
    return [
        (f"In which play does {c} appear?", f"{c} appears in {p}.")
        for p, cs in CHARACTERS.items()
        for c in cs
    ]


def task_antonym(rng):
    rows = []
    for a, b in ANTONYMS:
        rows.append((f"What is the opposite of {a}?", b))
        rows.append((f"What is the opposite of {b}?", a))
    return rows  # 'light' has two opposites; dedupe by prompt keeps the first


def task_plural(rng):
    return [(f"What is the plural of {s}?", p) for s, p in PLURALS]


def task_next(rng):
    rows = [(f"What day comes after {d}?", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    rows += [(f"What month comes after {m}?", MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    return rows


def task_quote(rng):
    return [(f"Complete the line: {a}", b) for a, b in QUOTES]


def unique(make, n):
    """Call make() until it has produced n rows with distinct prompts."""
    rows: dict[str, str] = {}
    while len(rows) < n:
        prompt, response = make()
        rows.setdefault(prompt, response)
    return list(rows.items())


def task_add(rng, n=90):
    def make():
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."

    return unique(make, n)


def task_repeat(rng, n=120):
    def make():
        p = phrase(rng)
        return f"Repeat: {p}", p

    return unique(make, n)


def task_reverse(rng, n=80):
    def make():
        words = phrase(rng).split()[: rng.randint(3, 5)]
        return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))

    return unique(make, n)


def task_upper(rng, n=60):
    def make():
        p = phrase(rng)
        return f"Write in capitals: {p}", p.upper()

    return unique(make, n)


def task_spell(rng, n=40):
    words = rng.sample(SPELL_WORDS, min(n, len(SPELL_WORDS)))
    return [(f"Spell {w} backwards.", w[::-1]) for w in words]


def task_count(rng, n=40):
    def make():
        p = phrase(rng)
        return f"How many words are in: {p}", f"{NUM_WORDS[len(p.split())].capitalize()}."

    return unique(make, n)


TASKS = [
    task_author,
    task_character,
    task_antonym,
    task_plural,
    task_next,
    task_quote,
    task_add,
    task_repeat,
    task_reverse,
    task_upper,
    task_spell,
    task_count,
]


def main() -> None:
    rng = random.Random(SEED)
    pool: list[dict[str, str]] = []
    seen: set[str] = set()
    for task in TASKS:
        for prompt, response in task(rng):
            if prompt not in seen:  # no prompt twice, within or across splits
                seen.add(prompt)
                pool.append({"prompt": prompt, "response": response})
    need = N_TRAIN + N_EVAL
    assert len(pool) >= need, f"only {len(pool)} unique rows"
    rng.shuffle(pool)
    pool = pool[:need]
    splits = {"train": pool[:N_TRAIN], "eval": pool[N_TRAIN:]}
    for name, rows in splits.items():
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        assert len(body.encode("utf-8")) < MAX_FILE_BYTES, (name, len(body))
        (HERE / f"{name}.jsonl").write_text(body, encoding="utf-8", newline="\n")
        print(f"{name}.jsonl: {len(rows)} rows, {len(body.encode('utf-8'))} bytes")


if __name__ == "__main__":
    main()
