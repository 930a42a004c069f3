"""The demo data set, generated here so a fresh machine needs nothing else.

Each skill is a small task with one exact answer, so the demo measures accuracy and not only
loss; a label-skewed partition over the `skill` column gives clients different skill mixes,
which is what makes federating them worth it.
"""

from __future__ import annotations

import random

from fedtune.core.catalog import SKILLS

Example = tuple[str, str]
COLUMNS = ("instruction", "input", "response", "rejected", "skill")  # of every generated row

WORDS = (  # noqa: SIM905 (a word list reads best as text)
    "apple river garden silver market window planet forest bottle candle orange pocket "
    "rabbit castle dragon jacket ladder magnet needle pencil rocket saddle tunnel violin "
    "wallet yellow anchor basket button carpet dinner engine family finger flower guitar "
    "hammer island kitten lemon mirror monkey napkin office parrot pepper pillow puzzle "
    "shadow spider summer ticket tomato travel turtle valley winter wizard bridge cookie "
    "doctor farmer garlic helmet jungle kettle lizard meadow museum nature oyster people "
    "pirate potato rhythm salmon season singer sister spring stereo stream sugar tablet "
    "teacher thunder tiger timber velvet wagon whisper window yogurt zebra circle silver "
).split()


def add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(10, 1000), 2)
    return f"Which number is larger: {a} or {b}?", str(max(a, b))


def uppercase(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return f"Write the word '{word}' in capital letters.", word.upper()


def parity(rng: random.Random) -> Example:
    n = rng.randint(10, 9999)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def successor(rng: random.Random) -> Example:
    n = rng.randint(10, 9998)
    return f"What number comes right after {n}?", str(n + 1)


def sort(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), 3)
    listed = ", ".join(map(str, numbers))
    return f"Sort from smallest to largest: {listed}.", ", ".join(map(str, sorted(numbers)))


def last_letter(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return f"What is the last letter of the word '{word}'?", word[-1]


def near_miss(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to a skill's question: the `rejected` response for DPO."""
    if answer in ("even", "odd"):
        return "odd" if answer == "even" else "even"
    if answer.isdigit():
        return str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    if ", " in answer:
        return ", ".join(reversed(answer.split(", ")))
    if len(answer) == 1:
        return chr((ord(answer) - ord("a") + rng.randint(1, 25)) % 26 + ord("a"))
    return answer.lower() if answer.isupper() else answer.upper()


def generate(skills: list[str], examples_per_skill: int, seed: int) -> list[dict[str, str]]:
    """Rows with instruction/input/response/rejected/skill; deterministic in `seed`, no duplicate
    prompts per skill. `rejected` (a near miss) draws from its own generator, so adding it left
    the rest of the data as it was."""
    rng = random.Random(seed)
    wrong = random.Random(seed + 1_000_003)
    rows: list[dict[str, str]] = []
    for skill in skills:
        make = SKILLS.get(skill)
        seen: set[str] = set()
        attempts = 0
        while len(seen) < examples_per_skill and attempts < examples_per_skill * 50:
            attempts += 1
            instruction, response = make(rng)
            if instruction not in seen:
                seen.add(instruction)
                rows.append(
                    {
                        "instruction": instruction,
                        "input": "",
                        "response": response,
                        "rejected": near_miss(response, wrong),
                        "skill": skill,
                    }
                )
    rng.shuffle(rows)
    return rows
