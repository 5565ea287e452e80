"""Generate the bundled example chat files deterministically: `python examples/make_examples.py`."""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (question phrasings, full answer, one-sentence summary)
FACTS: list[tuple[list[str], str, str]] = [
    (
        ["What does RoPE do?", "How do rotary position embeddings work?", "Explain RoPE briefly."],
        (
            "RoPE rotates query and key vectors by position-dependent angles so attention depends on relative "
            "position. Each pair of dimensions is rotated at its own frequency, and no position vector is added to "
            "the input."
        ),
        "RoPE encodes position by rotating queries and keys.",
    ),
    (
        ["What is attention in a transformer?", "How does self-attention work?"],
        (
            "Attention compares each query with every key, turns the scores into weights with a softmax, and returns "
            "the weighted sum of the values. It lets every token gather information from the other tokens."
        ),
        "Attention mixes values using softmax weights from query-key scores.",
    ),
    (
        ["What is a Mixture of Experts layer?", "How does MoE work in a language model?", "Explain MoE."],
        (
            "A Mixture of Experts layer holds several feed-forward experts and a router. For each token the router "
            "picks the top-k experts, so the model has many parameters but each token only uses a few of them."
        ),
        "MoE routes each token to a few of many experts.",
    ),
    (
        ["Why do MoE models use a load balancing loss?", "What is the auxiliary loss in MoE?"],
        (
            "Without help the router tends to send most tokens to a few experts. The load balancing loss rewards an "
            "even spread of tokens, so every expert is trained and no expert is overloaded."
        ),
        "It keeps tokens spread evenly across experts.",
    ),
    (
        ["What is causal masking?", "Why does a language model mask future tokens?"],
        (
            "Causal masking stops each position from attending to later positions. The model must predict the next "
            "token from the past only, which is exactly what it does when generating text."
        ),
        "It hides future tokens so the model predicts from the past.",
    ),
    (
        ["What does RMSNorm do?", "How is RMSNorm different from LayerNorm?"],
        (
            "RMSNorm divides a vector by its root mean square and multiplies by a learned scale. Unlike LayerNorm it "
            "does not subtract the mean, which makes it a little cheaper and works just as well."
        ),
        "RMSNorm rescales by the root mean square without centering.",
    ),
    (
        ["What is the learning rate warmup for?", "Why warm up the learning rate?"],
        (
            "At the start of training the gradients and optimizer statistics are noisy. Warmup raises the learning "
            "rate slowly over the first steps so early updates do not push the model into a bad region."
        ),
        "Warmup avoids large unstable updates at the start.",
    ),
    (
        ["What is ZeRO in DeepSpeed?", "How does ZeRO save memory?"],
        (
            "ZeRO splits the optimizer states, and optionally the gradients and the parameters, across data-parallel "
            "ranks. Each rank keeps only its share, so much larger models fit in the same GPU memory."
        ),
        "ZeRO shards training state across ranks to save memory.",
    ),
    (
        ["What is gradient accumulation?", "Why accumulate gradients?"],
        (
            "Gradient accumulation adds up the gradients of several micro-batches before one optimizer step. It gives "
            "the effect of a large batch when only a small batch fits in memory."
        ),
        "It sums gradients over micro-batches to simulate a larger batch.",
    ),
    (
        ["What is a tokenizer?", "Why do language models need a tokenizer?"],
        (
            "A tokenizer splits text into tokens and maps each token to an id. Byte-level BPE starts from bytes and "
            "merges frequent pairs, so it can encode any text, including emoji and accents like café."
        ),
        "A tokenizer turns text into token ids.",
    ),
    (
        ["What is perplexity?", "How do I read perplexity?"],
        (
            "Perplexity is the exponential of the average cross-entropy loss. A perplexity of 10 means the model is "
            "as uncertain as if it chose uniformly among 10 tokens at each step. Lower is better."
        ),
        "Perplexity is exp of the loss; lower is better.",
    ),
    (
        ["What does temperature do when sampling?", "How does temperature change generated text?"],
        (
            "Temperature divides the logits before the softmax. A low temperature makes the model pick likely tokens "
            "and repeat itself; a high temperature makes the output more varied and more random."
        ),
        "Temperature controls how random sampling is.",
    ),
    (
        ["What is top-p sampling?", "Explain nucleus sampling."],
        (
            "Top-p sampling keeps the smallest set of tokens whose probabilities add up to p and samples only from "
            "them. It cuts off the unlikely tail while adapting to how confident the model is."
        ),
        "Top-p samples from the smallest set covering probability p.",
    ),
    (
        ["What is a KV cache?", "Why is a KV cache used during generation?"],
        (
            "A KV cache stores the keys and values of tokens already processed. When generating the next token the "
            "model only computes the new token and reuses the cache, which makes generation much faster."
        ),
        "A KV cache reuses past keys and values to speed up generation.",
    ),
    (
        ["How do I reverse a list in Python?", "What is the easiest way to reverse a Python list?"],
        "Use slicing: `items[::-1]` returns a reversed copy. To reverse the list in place, call `items.reverse()`.",
        "Use `items[::-1]` or `items.reverse()`.",
    ),
    (
        ["How do I read a file line by line in Python?", "What is the best way to loop over lines of a file?"],
        (
            "Open the file with a `with` block and loop over it: `with open(path) as f: for line in f: ...`. The file "
            "is read lazily, so even a very large file uses little memory."
        ),
        "Loop over the open file object inside a `with` block.",
    ),
    (
        ["What is a Python dictionary?", "How do dictionaries work in Python?"],
        (
            "A dictionary maps keys to values. Lookups, inserts and deletes take constant time on average because "
            "the keys are stored in a hash table. Since Python 3.7 dictionaries keep insertion order."
        ),
        "A dictionary is a hash map from keys to values.",
    ),
    (
        ["What does git rebase do?", "Should I use git rebase?"],
        (
            "git rebase moves your commits so they start from a new base commit, replaying them one by one. It gives "
            "a straight history, but do not rebase commits that others have already pulled."
        ),
        "Rebase replays your commits on top of a new base.",
    ),
    (
        ["What is a unit test?", "Why write unit tests?"],
        (
            "A unit test checks one small piece of code, such as a function, against known inputs and expected "
            "outputs. Good tests catch regressions early and make it safe to change code."
        ),
        "A unit test checks one small piece of code.",
    ),
    (
        ["What is Big O notation?", "Explain Big O."],
        (
            "Big O describes how the running time or memory of an algorithm grows with the input size. For example, "
            "binary search is O(log n) and comparing every pair of items is O(n²)."
        ),
        "Big O describes how cost grows with input size.",
    ),
    (
        ["What is binary search?", "How does binary search work?"],
        (
            "Binary search finds an item in a sorted list by comparing it with the middle element and discarding the "
            "half that cannot contain it. It needs only about log2(n) comparisons."
        ),
        "Binary search halves a sorted range each step.",
    ),
    (
        ["What is the Pythagorean theorem?", "State Pythagoras' theorem."],
        (
            "In a right triangle, the square of the hypotenuse equals the sum of the squares of the other two sides: "
            "a² + b² = c². For example, a triangle with sides 3 and 4 has a hypotenuse of 5."
        ),
        "a² + b² = c² in a right triangle.",
    ),
    (
        ["What is a prime number?", "How do I know if a number is prime?"],
        (
            "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. To test n, check "
            "whether any number from 2 up to the square root of n divides it."
        ),
        "A prime has no divisors except 1 and itself.",
    ),
    (
        ["What is a derivative?", "Explain derivatives simply."],
        (
            "The derivative of a function measures how fast its output changes when the input changes a little. It "
            "is the slope of the tangent line; the derivative of x² is 2x."
        ),
        "A derivative is the instantaneous rate of change.",
    ),
    (
        ["How do I cook pasta?", "What is the right way to boil pasta?"],
        (
            "Bring a large pot of water to a boil, salt it well, add the pasta and stir. Cook it until it is al dente, "
            "taste a piece a minute before the time on the box, then drain and toss it with the sauce."
        ),
        "Boil in salted water until al dente, then drain and sauce.",
    ),
    (
        ["How do I make a crème brûlée?", "What is the trick to crème brûlée?"],
        (
            "Bake a custard of cream, egg yolks, sugar and vanilla in a water bath at a low temperature until it just "
            "sets. Chill it, sprinkle sugar on top and caramelize it with a torch right before serving."
        ),
        "Bake a gentle custard, chill it, then torch a sugar crust.",
    ),
    (
        ["How do I cook rice?", "What is a simple way to make rice?"],
        (
            "Rinse the rice, then cook one cup of rice in about one and a half cups of water. Bring it to a boil, "
            "cover, simmer on low heat for 15 minutes and let it rest for 5 minutes before fluffing it with a fork."
        ),
        "Rinse, simmer covered with 1.5 parts water, then rest.",
    ),
    (
        ["Why does bread dough need to rise?", "What does yeast do in bread?"],
        (
            "Yeast eats sugars in the dough and releases carbon dioxide. The gas is trapped by the gluten network, so "
            "the dough rises and the baked bread is light instead of dense."
        ),
        "Yeast makes gas that gluten traps, so bread is light.",
    ),
    (
        ["Why is the sky blue?", "What makes the sky look blue?"],
        (
            "Sunlight is scattered by the molecules in the air, and short blue wavelengths scatter much more than red "
            "ones. That scattered blue light reaches our eyes from every direction of the sky."
        ),
        "Air scatters blue light more than red light.",
    ),
    (
        ["How do plants make food?", "What is photosynthesis?"],
        (
            "Plants use photosynthesis: chlorophyll captures sunlight, and the plant uses that energy to turn carbon "
            "dioxide and water into sugar, releasing oxygen as a by-product."
        ),
        "Photosynthesis turns light, CO2 and water into sugar and oxygen.",
    ),
    (
        ["How can I sleep better?", "Any tips for better sleep?"],
        (
            "Keep a regular schedule, get daylight in the morning, avoid caffeine late in the day and keep the bedroom "
            "dark and cool. Putting screens away half an hour before bed also helps."
        ),
        "Keep a regular schedule and a dark, cool, screen-free bedroom.",
    ),
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer clearly.",
    "You are Lumina, a friendly assistant that explains things simply.",
    "You are a patient tutor.",
]
GREETINGS = [("Hi!", "Hello! How can I help you today?"), ("Hello there.", "Hi! What would you like to know?")]
THANKS = [
    ("Thanks!", "You're welcome! Let me know if you have another question."),
    ("Great, thank you.", "Glad it helped!"),
    ("Merci beaucoup !", "Avec plaisir ! You're welcome."),
    ("ありがとう!", "どういたしまして! You're welcome 😊"),
]
SUMMARY_ASKS = ["Can you say that in one sentence?", "Summarize that briefly.", "TL;DR?"]
USER_ALIASES = ["user"] * 6 + ["human", "prompter", "User"]
ASSISTANT_ALIASES = ["assistant"] * 6 + ["ai", "bot", "Assistant"]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """A small arithmetic question and its worked answer."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    result = a + b if op == "+" else a - b if op == "-" else a * b
    question = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"])
    return question.format(a=a, op=op, b=b), f"{a} {op} {b} = {result}."


def _exchange(rng: random.Random) -> tuple[str, str, str]:
    """A first question with its answer and a one-sentence summary."""
    if rng.random() < 0.2:
        question, answer = _arithmetic(rng)
        return question, answer, answer
    questions, answer, summary = rng.choice(FACTS)
    return rng.choice(questions), answer, summary


def _follow_up(rng: random.Random, summary: str | None) -> tuple[str, str, str | None]:
    """A later user turn: summarize the previous answer, thank, or a new topic; returns the summary now in play."""
    kind = rng.random()
    if kind < 0.35 and summary is not None:
        return rng.choice(SUMMARY_ASKS), summary, None
    if kind < 0.55:
        question, answer = rng.choice(THANKS)
        return question, answer, None
    return _exchange(rng)


def make_conversation(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """One conversation: optional system prompt, optional greeting, 1 to 3 user turns."""
    user, assistant = rng.choice(USER_ALIASES), rng.choice(ASSISTANT_ALIASES)
    messages: list[dict[str, str]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.1:
        turns.append(rng.choice(GREETINGS))
    question, answer, summary = _exchange(rng)
    summary_or_none: str | None = summary
    turns.append((question, answer))
    for _ in range(rng.choice([0, 0, 1, 2]) if len(turns) == 1 else 0):
        question, answer, summary_or_none = _follow_up(rng, summary_or_none)
        turns.append((question, answer))
    for question, answer in turns:
        messages.append({"role": user, "content": question})
        messages.append({"role": assistant, "content": answer})
    return {"messages": messages}


def write_jsonl(path: Path, rows: list[dict[str, list[dict[str, str]]]]) -> None:
    """Write one JSON object per line, UTF-8, non-ASCII kept readable."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def bad_lines() -> bytes:
    """A fixture with one line per error kind (line numbers are listed in tests/data/test_reader.py)."""
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    aliased = {"messages": [{"role": " Human ", "content": "2+2?"}, {"role": "BOT", "content": "4."}]}
    lines = [
        json.dumps(good),
        '{"messages": [',
        "[1, 2, 3]",
        json.dumps({"conversation": []}),
        json.dumps({"messages": []}),
        json.dumps({"messages": ["hello"]}),
        json.dumps({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}),
        json.dumps({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "Hello"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        None,  # invalid UTF-8, written as raw bytes below
        json.dumps({"messages": [{"role": "user", "content": "Anyone there?"}]}),
        json.dumps(aliased),
        "",
        json.dumps({"messages": "hello"}),
        json.dumps(good),
    ]
    invalid = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'
    return b"".join((invalid if line is None else line.encode()) + b"\n" for line in lines)


def main() -> None:
    """Write conversations.jsonl, conversations_eval.jsonl and bad_lines.jsonl next to this script."""
    train_rng, eval_rng = random.Random(1234), random.Random(5678)
    write_jsonl(HERE / "conversations.jsonl", [make_conversation(train_rng) for _ in range(480)])
    write_jsonl(HERE / "conversations_eval.jsonl", [make_conversation(eval_rng) for _ in range(50)])
    (HERE / "bad_lines.jsonl").write_bytes(bad_lines())


if __name__ == "__main__":
    main()
