"""`jaxlm convert` and `jaxlm generate` end to end, in process."""

import numpy as np
import pytest

from jaxlm.cli import main


def test_help_for_every_command(capsys):
    for cmd in ("convert", "generate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: jaxlm " + cmd in capsys.readouterr().out


def test_convert_generate_and_back(tmp_path, capsys):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_util import hf_logits, phi3_model

    model, folder = phi3_model(tmp_path, tie_word_embeddings=True)
    # give the HF folder a tokenizer, as real ones have
    from jaxlm.data.tokenizer import train_bpe

    tok = train_bpe(["hello world, hello there, general kenobi"] * 20, 300)
    tok.save(folder / "tokenizer.json")
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--from-hf", str(folder), "--out", str(ckpt)]) == 0
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "hello", "--max-new-tokens", "5",
                 "--no-stop"]) == 0
    out = capsys.readouterr()
    assert "decode 5 tokens" in out.err and out.out.strip()

    back = tmp_path / "back"
    assert main(["convert", "--to-hf", "--checkpoint", str(ckpt), "--out", str(back)]) == 0
    again = transformers.Phi3ForCausalLM.from_pretrained(back).eval()
    tokens = np.arange(1, 20)[None]
    np.testing.assert_array_equal(hf_logits(again, tokens), hf_logits(model, tokens))


def test_generate_from_fresh_config(capsys):
    assert main(["generate", "--config", "configs/tiny.py", "--config.model.num_layers=1", "--prompt", "To be",
                 "--max-new-tokens", "4", "--no-stop"]) == 0
    assert "freshly initialised" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["convert", "--from-hf", "/nonexistent", "--out", "x"], "config.json not found"),
    (["convert", "--to-hf", "--out", "x"], "--to-hf needs --checkpoint"),
    (["generate", "--checkpoint", "/nonexistent", "--prompt", "x"], "does not exist"),
    (["generate", "--config", "configs/tiny.py", "--config.model.num_heads=3", "--prompt", "x"],
     "not divisible by model.num_kv_heads"),
    (["generate", "--config", "configs/tiny.py", "--config.modle.x=1", "--prompt", "x"], "unknown config field"),
])
def test_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err.replace("\n", "")
