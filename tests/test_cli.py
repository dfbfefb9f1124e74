"""User entry points: the ``flashformer-triton`` command line, the byte tokenizer and the
quick-start notebook (its code cells executed in order on the tiny default)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HAS_CUDA

from flashformer_triton.cli import main
from flashformer_triton.config import PRESETS
from flashformer_triton.loading import random_state_dict, save_checkpoint
from flashformer_triton.tokenizer import ByteTokenizer, TextStreamer

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # As on a fresh machine: without TRITON_INTERPRET (conftest sets it for this process);
    # importing flashformer_triton switches the interpreter on when there is no GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "flashformer_triton.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


# Subprocesses: what a new user types.


def test_generate_tiny_in_a_subprocess() -> None:
    proc = _cli("generate", "--model", "tiny", "--prompt", "Hi", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hi")
    assert "3 tokens" in proc.stderr and "tokens/s" in proc.stderr and "ms/token" in proc.stderr
    if not HAS_CUDA:  # the interpreter notice: one line, once
        assert proc.stderr.count("Triton interpreter, which is slow") == 1


def test_info_tiny_in_a_subprocess() -> None:
    proc = _cli("info", "--model", "tiny")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in (
        "torch",
        "device:",
        "llama: 2 layers",
        "plan:",
        "tasks",
        "tiles:",
        "per decode step",
        "floor at",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"


@pytest.mark.skipif(shutil.which("flashformer-triton") is None, reason="console script absent")
def test_console_script_is_installed() -> None:
    proc = subprocess.run(
        ["flashformer-triton", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "flashformer-triton" in proc.stdout


# In-process runs (faster) for the other paths.


def test_help_texts(capsys) -> None:
    assert main([]) == 2
    top = capsys.readouterr().out
    assert "generate" in top and "info" in top and "tiny" in top
    for command in ("generate", "info"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "--model" in text and "--device" in text


def _checkpoint_with_tokenizer(path: Path) -> Path:
    """A tiny checkpoint plus a word-level tokenizer.json ('w5' is token 5)."""
    tokenizers = pytest.importorskip("tokenizers")
    config = PRESETS["tiny"]
    save_checkpoint(path, config, random_state_dict(config, seed=0, generator_device="cpu"))
    vocab = {f"w{i}": i for i in range(1, config.vocab_size)} | {"[UNK]": 0}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"})
    )
    return path


def test_generate_with_the_checkpoints_own_tokenizer(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    ckpt = _checkpoint_with_tokenizer(tmp_path / "ckpt")
    args = ["generate", "--model", str(ckpt), "--max-new-tokens", "2", "--device", DEVICE]
    assert main([*args, "--prompt", "w5 w6 w7"]) == 0
    text = capsys.readouterr().out.strip()
    words = text.split()
    assert words[:3] == ["w5", "w6", "w7"] and len(words) == 5, text
    # the same prompt as ids, sampled: greedy and ids agree on the prompt part
    assert main([*args, "--prompt-ids", "5,6,7", "--temperature", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out.split()[:3] == ["w5", "w6", "w7"]


def test_checkpoint_without_tokenizer_needs_prompt_ids(tmp_path, capsys) -> None:
    config = PRESETS["tiny"]
    ckpt = save_checkpoint(
        tmp_path / "bare", config, random_state_dict(config, seed=0, generator_device="cpu")
    )
    assert main(["generate", "--model", str(ckpt), "--prompt", "hello", "--device", DEVICE]) == 1
    assert "--prompt-ids" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--model",
                str(ckpt),
                "--prompt-ids",
                "1,2,3",
                "--max-new-tokens",
                "1",
                "--device",
                DEVICE,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.split()
    assert len(out) == 1 and 0 <= int(out[0]) < config.vocab_size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "/no/such/dir"], "no checkpoint directory"),
        (["generate", "--model", "tiny", "--max-new-tokens", "600"], "exceeds max_seq_len=512"),
        (["generate", "--model", "tiny", "--prompt-ids", ""], "prompt is empty"),
        (["generate", "--model", "tiny", "--prompt-ids", "1,x"], "comma-separated integers"),
        (["generate", "--model", "tiny", "--temperature", "-1"], "temperature"),
        (["generate", "--model", "llama-3.2-1b"], "--prompt-ids"),
        (["info", "--model", "tiny", "--max-batch-size", "17"], "outside the supported range"),
    ],
    ids=[
        "missing-dir",
        "too-long",
        "empty-prompt",
        "bad-ids",
        "temperature",
        "no-tokenizer",
        "batch",
    ],
)
def test_errors_are_one_clear_line(args: list[str], message: str, capsys) -> None:
    assert main([*args, "--device", DEVICE]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(HAS_CUDA, reason="checks the message when CUDA is absent")
def test_cuda_asked_for_but_absent(capsys) -> None:
    assert main(["generate", "--model", "tiny", "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


# The byte tokenizer of the tiny model.


def test_byte_tokenizer_layout_and_round_trip() -> None:
    tok = ByteTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.vocab_size == PRESETS["tiny"].vocab_size == 7 + 256
    assert PRESETS["tiny"].eos_token_id == [tok.eos_token_id]
    assert tok.encode("A") == [1, 7 + 65]
    assert tok.encode("A", add_special_tokens=False) == [72]
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert all(0 <= i < 263 for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode([1, 72, 2]) == "<bos>A<eos>"


def test_text_streamer_waits_for_whole_characters() -> None:
    tok = ByteTokenizer()
    prompt = tok.encode("a")
    streamer = TextStreamer(tok, prompt)
    assert streamer.prompt_text == "a"
    pieces = [streamer.put(t) for t in tok.encode("✓b", add_special_tokens=False)]
    assert pieces == ["", "", "✓", "b"]  # three UTF-8 bytes, shown when complete
    streamer.put(7 + 0xE2)  # a cut character stays held back until flush
    assert streamer.flush() == "\ufffd"


# The notebook.


def test_quickstart_notebook_runs_top_to_bottom(monkeypatch) -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless, in case matplotlib is installed
    namespace: dict = {"__name__": "__main__"}
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), (
            "notebook code must be plain Python (no IPython magics)"
        )
        exec(compile(source, f"{NOTEBOOK.name} cell {index}", "exec"), namespace)
    assert namespace["error"] < 1e-3  # kernel and reference agree
    assert namespace["kernel_ms"] > 0 and namespace["reference_ms"] > 0
    assert torch.equal(namespace["batch"], namespace["again"])


# profile and autotune: argument parsing and the refusal without a GPU.


def test_profile_and_autotune_arguments() -> None:
    from flashformer_triton.cli import _parser

    args = _parser().parse_args(
        ["profile", "--model", "llama-3.1-8b", "--batch", "4", "--pos", "8192", "--out",
         "t.png", "--json", "t.json"]
    )
    assert (args.command, args.model, args.batch, args.pos, args.out, args.json) == (
        "profile", "llama-3.1-8b", 4, 8192, "t.png", "t.json"
    )
    assert (args.device, args.dtype, args.max_seq_len, args.programs) == (
        "cuda", "bfloat16", None, 64
    )
    defaults = _parser().parse_args(["profile"])
    assert (defaults.model, defaults.batch, defaults.pos, defaults.out) == (
        "llama-3.2-1b", 1, 512, "timeline.png"
    )
    tune = _parser().parse_args(["autotune", "--model", "qwen3-8b", "--batch", "1", "16",
                                 "--budget-s", "120", "--output", "t.json"])
    assert (tune.batch, tune.budget_s, tune.output, tune.strategy) == (
        [1, 16], 120.0, "t.json", "coordinate"
    )


def test_help_lists_profile_and_autotune(capsys) -> None:
    assert main([]) == 2
    top = capsys.readouterr().out
    assert "profile" in top and "autotune" in top
    for command in ("profile", "autotune"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "--model" in text and "--batch" in text and "CUDA" in text


@pytest.mark.skipif(HAS_CUDA, reason="checks the message when CUDA is absent")
def test_profile_without_cuda_is_one_clear_line(tmp_path, capsys) -> None:
    out = tmp_path / "timeline.png"
    assert main(["profile", "--model", "llama-3.2-1b", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "profile needs a CUDA GPU" in err and "Traceback" not in err
    assert not out.exists()


def test_profile_without_cuda_in_a_subprocess() -> None:
    if HAS_CUDA:
        pytest.skip("checks the message when CUDA is absent")
    proc = _cli("profile", "--model", "tiny", "--out", "never.png", timeout=120)
    assert proc.returncode == 1
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (ROOT / "never.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "outside the supported range"),
        (["--pos", "5000", "--max-seq-len", "4096"], "must be below"),
        (["--device", "cpu"], "--device must be cuda"),
    ],
    ids=["batch", "pos", "cpu"],
)
def test_profile_argument_errors(args: list[str], message: str, capsys) -> None:
    assert main(["profile", "--model", "tiny", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.gpu
def test_profile_on_the_gpu(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out, records = tmp_path / "t.png", tmp_path / "t.json"
    assert main(["profile", "--model", "tiny", "--out", str(out), "--json", str(records)]) == 0
    text = capsys.readouterr().out
    assert "QKV" in text and "working" in text
    assert out.stat().st_size > 0 and json.loads(records.read_text())["records"]
