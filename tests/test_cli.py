"""`jaxlm convert` and `jaxlm generate` end to end, in process."""

import numpy as np
import pytest

from jaxlm.cli import main


def test_help_for_every_command(capsys):
    from jaxlm.cli import COMMANDS

    assert len(COMMANDS) >= 9
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0, cmd
        out = capsys.readouterr().out
        assert "usage: jaxlm " + cmd in out and "-h, --help" in out, cmd
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(cmd in out for cmd in COMMANDS)


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


def test_generate_reports_the_s2_cache_per_layer(capsys):
    """Layer 1 dense (dense_every_n=2), layers 0 and 2 S2-compressed: the report's bytes are those of
    the cache written out by hand (prompt bucket 16 + 496 new tokens = 512 positions, fp32, batch 1)."""
    argv = ["generate", "--config", "configs/tiny.py", "--config.model.num_layers=3", "--prompt", "To be",
            "--max-new-tokens", "496", "--no-stop", "--kv-report", "--config.model.attention.impl=s2",
            "--config.model.attention.s2.block_size=16", "--config.model.attention.s2.local_blocks=1",
            "--config.model.attention.s2.vert_stride=4", "--config.model.attention.s2.dense_every_n=2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    hkv, hd = 2, 128 // 4
    full = 2 * 512 * hkv * hd * 4  # K and V, 512 positions
    slots = (32 // 4 + 1) + 1 + 1  # vertical blocks of 32 (stride 4) + 1, one ring block, one trash slot
    s2 = 2 * hkv * slots * 16 * hd * 4
    assert f"2 s2 layers x {s2 / 2**20:.2f} MiB, 1 dense layer x {full / 2**20:.2f} MiB" in err
    assert f"an S2 layer keeps {s2 / full:.0%} of a full layer's cache" in err and s2 / full < 0.4
    assert "KV cache per layer" in err and err.count(" s2 ") >= 2
    # 16 + 8 positions: the compressed layout (4 slots of 16) would be larger, so the full cache is used
    argv = [a if a != "496" else "8" for a in argv]
    assert main(argv) == 0
    assert f"KV cache {3 * 2 * 24 * hkv * hd * 4 / 2**20:.2f} MiB: 3 full layers" in capsys.readouterr().err
