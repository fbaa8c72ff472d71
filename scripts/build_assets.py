"""Build the assets shipped inside the ``prefmodule`` package.

Writes, under ``--out`` (default: ``prefmodule/assets`` in the repo):

* ``demo/train.jsonl``, ``demo/val.jsonl`` -- preference pairs
  ``{"prompt", "chosen", "rejected"}``: a short how-to request, a polite helpful
  on-topic answer (chosen) and a rude, dismissive or off-topic one (rejected).
  Val uses topics that never appear in train.
* ``demo/conversational.jsonl`` -- the same kind of pairs as chat messages.
* ``arithmetic/{train,val}.jsonl`` and ``arithmetic/{train,val}_text.jsonl`` -- two-digit
  addition and subtraction prompts with their answers, as chat messages and as text
  (``scripts/arithmetic_task.py``), for GRPO/RLOO with verifiable rewards.
* ``tiny-llama/`` -- a randomly initialised tiny Llama causal LM and a byte-level
  BPE tokenizer trained on the demo text (BOS added, no EOS, ChatML template).
* ``README.md`` -- what the assets are and how to rebuild them.

Everything is seeded, so two runs give byte-identical files:

    python scripts/build_assets.py
"""

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from arithmetic_task import write_task as write_arithmetic_task  # scripts/ is on sys.path when run as a script

SEED = 1234
REPO_ROOT = Path(__file__).resolve().parent.parent

# Each topic: "task | step | step | step" (steps are imperative phrases, in order).
TOPICS = [
    "bake bread | mix flour, water, yeast and salt | knead the dough for ten minutes | let it rise before baking",
    "boil an egg | bring a pot of water to a boil | lower the egg in gently | cook it for eight minutes",
    "make a cup of tea | heat fresh water | steep the tea bag for three minutes | add milk or lemon to taste",
    "cook rice | rinse the rice until the water runs clear | use two cups of water per cup of rice | simmer it with the lid on",
    "make a salad | wash and dry the greens | add some crunchy vegetables | toss it with a light dressing",
    "grow tomatoes | pick a sunny spot | water the plants deeply twice a week | tie the stems to a stake",
    "water a cactus | let the soil dry out completely | water it thoroughly | empty the saucer afterwards",
    "repot a plant | choose a pot one size bigger | loosen the roots gently | fill in with fresh soil",
    "start a compost pile | mix green and brown scraps | keep the pile damp | turn it every week",
    "plant a tree | dig a hole twice as wide as the roots | set the tree at the right depth | water it well after planting",
    "fix a flat bike tire | remove the wheel | patch or replace the tube | pump it to the right pressure",
    "change a light bulb | switch off the power | let the old bulb cool | screw in a bulb of the same type",
    "unclog a sink | pour boiling water down the drain | use a plunger | clean the trap under the sink",
    "paint a room | clean and tape the walls | apply a coat of primer | paint two thin coats",
    "hang a picture | find a stud or use a wall anchor | mark the height with a pencil | check it with a level",
    "back up my files | pick an external drive or cloud storage | copy your important folders | schedule automatic backups",
    "make a strong password | use at least twelve characters | mix words, numbers and symbols | keep it in a password manager",
    "speed up my laptop | close programs you are not using | remove startup apps | free up some disk space",
    "learn to code | pick one beginner language | build small projects | practise a little every day",
    "write a good email | start with a clear subject line | keep the message short | end with a friendly sign-off",
    "take better photos | use natural light | keep the camera steady | follow the rule of thirds",
    "start running | begin with short easy runs | mix walking and running | rest between training days",
    "improve my posture | keep your screen at eye level | take short breaks to stretch | strengthen your back muscles",
    "sleep better | go to bed at the same time | avoid screens before bed | keep the bedroom cool and dark",
    "drink more water | carry a reusable bottle | drink a glass with every meal | set gentle reminders",
    "learn to swim | start in shallow water | practise floating and breathing | take lessons with a coach",
    "stretch after a workout | hold each stretch for thirty seconds | breathe slowly | never bounce in a stretch",
    "plan a trip | set a budget | book transport and a place to stay | make a short list of things to see",
    "pack a suitcase | make a packing list | roll your clothes | put heavy items at the bottom",
    "beat jet lag | adjust your sleep a few days early | get daylight when you arrive | stay hydrated on the flight",
    "save money | track what you spend | set up an automatic transfer to savings | cut one regular expense",
    "make a budget | list your monthly income | write down fixed costs | set limits for everything else",
    "study for an exam | make a study schedule | test yourself with practice questions | get enough sleep before the exam",
    "learn a new language | practise a few minutes every day | learn common phrases first | talk with native speakers",
    "give a good presentation | know your main message | practise out loud | speak slowly and make eye contact",
    "take better notes | write in your own words | use headings and short lists | review them the same day",
    "make new friends | join a club or class | ask people about themselves | follow up and make plans",
    "apologise to a friend | say clearly what you did wrong | listen to how they feel | offer to make it right",
    "write a thank you note | name the gift or favour | say how it helped you | keep it short and warm",
    "train a puppy | use treats as rewards | keep sessions short | be patient and consistent",
    "care for a goldfish | use a large filtered tank | feed it a small pinch once a day | change some of the water weekly",
    "clean a cast iron pan | rinse it with hot water | dry it completely | rub in a thin layer of oil",
    "remove a coffee stain | blot the stain quickly | rinse it with cold water | treat it with a little soap",
    "fold a fitted sheet | tuck the corners into each other | lay it flat | fold it into a neat rectangle",
    "organise my closet | take everything out | donate what you no longer wear | group your clothes by type",
    "iron a shirt | start with the collar | iron the sleeves next | finish with the front and back",
    "sew on a button | thread a needle with a knot | stitch through the holes several times | tie off the thread underneath",
    "build a campfire | clear a safe spot | stack small sticks over some tinder | add bigger logs slowly",
    "read a map | find the legend and the scale | turn the map to match north | pick out landmarks around you",
    "stay focused at work | turn off notifications | work in short blocks | take a real break at lunch",
    "prepare for a job interview | research the company | practise common questions | prepare a few questions of your own",
    "write a short story | pick one main character | give your hero a clear problem | end with a change",
    "learn to juggle | start with one ball | throw in a smooth arc | add the next ball slowly",
    "make pancakes | whisk flour, milk and eggs | heat a lightly oiled pan | flip them when bubbles appear",
    "keep basil alive | give it plenty of sun | water it when the soil feels dry | pinch off the flowers",
    "clean my keyboard | unplug it first | shake out the crumbs | wipe the keys with a damp cloth",
    "set up a fish tank | rinse the gravel | fill and filter the water | wait a few weeks before adding fish",
    "make cold brew coffee | grind the beans coarsely | soak the grounds in cold water overnight | strain and dilute to taste",
    "write a shopping list | check what you already have | group items by aisle | stick to the list in the shop",
    "relax after a long day | take a short walk | listen to calm music | write down three good things",
]
VAL_TOPICS = 12  # the last topics after shuffling go to val only
ROWS = {"train": 800, "val": 200, "conversational": 50}

REQUESTS = [
    "How do I {task}?",
    "Can you tell me how to {task}?",
    "What is the best way to {task}?",
    "I want to {task}. Any tips?",
    "Please explain how to {task}.",
    "Could you help me {task}?",
    "Any advice on how to {task}?",
    "I have never tried to {task}. Where do I start?",
]

HELPFUL_OPENERS = ["Sure, happy to help!", "Of course!", "Great question!", "Glad you asked.", "Absolutely.", ""]
HELPFUL_BODIES = [
    "To {task}, {a}.",
    "The most important thing is to {a}.",
    "First {a}, then {b}.",
    "I would {a} first, and then {b}.",
    "Try to {a}, and then {b}.",
]
HELPFUL_CLOSERS = [
    "Hope this helps!",
    "Good luck, you've got this.",
    "Let me know if you have more questions.",
    "Feel free to ask if anything is unclear.",
    "Have fun with it!",
    "",
]

RUDE_OPENERS = ["Ugh.", "Seriously?", "Whatever.", "Meh.", "Oh please.", ""]
RUDE_BODIES = [
    "Why would I help you {task}? Go look it up yourself.",
    "Nobody cares how you {task}. That is a boring question.",
    "Figure out how to {task} on your own, I am busy.",
    "I don't feel like talking about that. I would rather talk about {other}.",
    "Who even asks that? Anyway, let's talk about {other} instead.",
    "Not my job. Ask someone else, or better, don't ask at all.",
]
RUDE_EXTRAS = [
    "I have better things to do.",
    "What a waste of my time.",
    "You should already know this.",
    "Honestly, that is a silly thing to ask.",
    "",
]
RUDE_OTHERS = ["my lunch", "football scores", "my new shoes", "the weather on Mars", "video games", "celebrity gossip"]
RUDE_CLOSERS = ["Stop bothering me.", "Don't ask me again.", "Not my problem.", "Go away.", "Just leave me alone.", ""]

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly and patient assistant.", "Answer briefly and kindly."]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def parse_topic(line):
    task, *steps = (part.strip() for part in line.split("|"))
    return task, steps


def join_sentences(*parts):
    return " ".join(part for part in parts if part)


def helpful_answer(rng, task, steps):
    start = rng.randrange(len(steps) - 1)
    a, b = steps[start : start + 2]  # two consecutive steps
    body = rng.choice(HELPFUL_BODIES).format(task=task, a=a, b=b)
    return join_sentences(rng.choice(HELPFUL_OPENERS), body, rng.choice(HELPFUL_CLOSERS))


def rude_answer(rng, task):
    body = rng.choice(RUDE_BODIES).format(task=task, other=rng.choice(RUDE_OTHERS))
    return join_sentences(rng.choice(RUDE_OPENERS), body, rng.choice(RUDE_EXTRAS), rng.choice(RUDE_CLOSERS))


def make_pairs(rng, topics, n_rows):
    """Sample ``n_rows`` distinct (prompt, chosen, rejected) triples from ``topics``."""
    rows, seen = [], set()
    while len(rows) < n_rows:
        task, steps = parse_topic(rng.choice(topics))
        their_task = task.replace("my ", "your ")  # the answer speaks to the user
        row = {
            "prompt": rng.choice(REQUESTS).format(task=task),
            "chosen": helpful_answer(rng, their_task, steps),
            "rejected": rude_answer(rng, their_task),
        }
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def to_conversational(rng, row):
    prompt = [{"role": "user", "content": row["prompt"]}]
    if rng.random() < 0.4:
        prompt.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def build_datasets():
    rng = random.Random(SEED)
    topics = TOPICS[:]
    rng.shuffle(topics)
    train_topics, val_topics = topics[:-VAL_TOPICS], topics[-VAL_TOPICS:]
    train = make_pairs(rng, train_topics, ROWS["train"])
    val = make_pairs(rng, val_topics, ROWS["val"])
    chat_pairs = make_pairs(rng, topics, ROWS["conversational"])
    conversational = [to_conversational(rng, row) for row in chat_pairs]
    return {"train": train, "val": val, "conversational": conversational}


def corpus_lines(datasets):
    """All demo text; chat messages as "role\ncontent" so role names get their own tokens."""
    for split in ("train", "val"):
        for row in datasets[split]:
            yield from row.values()
    for row in datasets["conversational"]:
        for message in row["prompt"] + row["chosen"] + row["rejected"]:
            yield f"{message['role']}\n{message['content']}"


def build_tokenizer(corpus, vocab_size=1024, model_max_length=512):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", bpe.token_to_id("<s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_model(tokenizer):
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=False,
        **special_ids,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(**special_ids)
    return model


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


ARITHMETIC_ROWS = {"train": 200, "val": 50}
ONE_DIGIT_ROWS = {"train": 60, "val": 30}  # of the 90 one-digit problems


def write_readme(path, tokenizer, model):
    n_params = sum(p.numel() for p in model.parameters())
    path.write_text(
        "# prefmodule assets\n\n"
        "Rebuild with `python scripts/build_assets.py` (seeded: byte-identical on every rebuild).\n\n"
        f"- `demo/train.jsonl` ({ROWS['train']} rows), `demo/val.jsonl` ({ROWS['val']} rows): preference pairs "
        '`{"prompt", "chosen", "rejected"}`. The prompt is a short how-to request; *chosen* is a '
        "polite, helpful, on-topic answer, *rejected* a rude, dismissive or off-topic one of similar length. "
        "Val topics never appear in train.\n"
        f"- `demo/conversational.jsonl` ({ROWS['conversational']} rows, all topics): the same kind of pairs "
        "as chat messages (`prompt` is a list of `{role, content}` messages, some with a system message; "
        "`chosen`/`rejected` hold one assistant message each).\n"
        f"- `arithmetic/train.jsonl` ({ARITHMETIC_ROWS['train']} rows), `arithmetic/val.jsonl` "
        f"({ARITHMETIC_ROWS['val']} rows): prompts with answers `{{\"prompt\", \"answer\"}}` for GRPO/RLOO: a "
        "two-digit addition or subtraction asked as a chat message that ends 'End your reply with \"The answer is "
        "N.\"'; `answer` is the result as text. `train_text.jsonl`/`val_text.jsonl`: the same problems as "
        "plain-text prompts (`Question: ... Answer:`). No problem is in both splits. Written by "
        "`scripts/arithmetic_task.py`; score with `prefmodule.sampling.rules:exact_match` and `:answer_format`. "
        f"`train_one_digit.jsonl`/`val_one_digit.jsonl` ({ONE_DIGIT_ROWS['train']}/{ONE_DIGIT_ROWS['val']} rows): "
        "one-digit operands, the question alone (no instruction), as chat messages: the real-model GRPO walk.\n"
        f"- `tiny-llama/`: a randomly initialised Llama causal LM ({n_params:,} parameters, float32) and a "
        f"byte-level BPE tokenizer trained on the demo text (vocab {len(tokenizer)}; adds BOS `<s>` "
        f"(id {tokenizer.bos_token_id}), never EOS `</s>` (id {tokenizer.eos_token_id}); pad `<pad>` "
        f"(id {tokenizer.pad_token_id}); ChatML chat template with `<|im_start|>`/`<|im_end|>`). "
        "It knows nothing until trained: for tests and demos only.\n",
        encoding="utf-8",
    )


def describe(out):
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>9,d}  {path.relative_to(out)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "prefmodule" / "assets")
    out = parser.parse_args().out
    hf_logging.disable_progress_bar()

    datasets = build_datasets()
    for name, rows in datasets.items():
        write_jsonl(out / "demo" / f"{name}.jsonl", rows)
    for suffix, text in (("", False), ("_text", True)):
        write_arithmetic_task(out / "arithmetic", ARITHMETIC_ROWS["train"], ARITHMETIC_ROWS["val"], text=text,
                              suffix=suffix)
    write_arithmetic_task(out / "arithmetic", *ONE_DIGIT_ROWS.values(), suffix="_one_digit", digits=1,
                          instruction=False)

    tokenizer = build_tokenizer(corpus_lines(datasets))
    model = build_model(tokenizer)
    tokenizer.save_pretrained(out / "tiny-llama")
    model.save_pretrained(out / "tiny-llama")
    write_readme(out / "README.md", tokenizer, model)

    print(f"Wrote {out}:")
    describe(out)


if __name__ == "__main__":
    main()
